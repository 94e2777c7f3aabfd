"""/metrics after traffic, the queue limit (429), bounded adapter labels, and a client that leaves
mid-stream: its sequence and KV blocks are freed."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import API_KEY, engine_options, run_server

from loraplex.config import ServerConfig

USER = {"Authorization": f"Bearer {API_KEY}"}


def scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of every sample."""
    text = httpx.get(f"{server.url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def complete(server, model: str, max_tokens: int = 5, prompt: str = "The quick brown fox", **extra):
    resp = httpx.post(f"{server.url}/v1/completions", headers=USER, timeout=60,
                      json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "ignore_eos": True, **extra})
    return resp


def wait_idle(server, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        stats = server.state.engine.engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine did not free its sequences: {stats}")
        time.sleep(0.05)


def test_counters_move_with_traffic(live_server):
    before = scrape(live_server)
    prompt_tokens = 0
    for model in ("alpha", "alpha", "demo"):
        resp = complete(live_server, model)
        assert resp.status_code == 200
        prompt_tokens += resp.json()["usage"]["prompt_tokens"] if model == "alpha" else 0
    after = scrape(live_server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("loraplex_requests_total", adapter="alpha", outcome="length") == 2
    assert delta("loraplex_requests_total", adapter="base", outcome="length") == 1
    assert delta("loraplex_generation_tokens_total", adapter="alpha") == 10
    assert delta("loraplex_prompt_tokens_total", adapter="alpha") == prompt_tokens
    assert delta("loraplex_time_to_first_token_seconds_count", adapter="alpha") == 2
    assert delta("loraplex_e2e_request_latency_seconds_count", adapter="base") == 1
    assert delta("loraplex_inter_token_latency_seconds_count", adapter="alpha") == 2 * 4
    assert value(after, "loraplex_adapters_resident", tier="device") >= 1
    assert value(after, "loraplex_adapter_loads_total", tier="device") >= 1
    assert value(after, "loraplex_num_requests_running") == 0
    assert value(after, "loraplex_kv_cache_blocks") > 0
    assert 0 <= value(after, "loraplex_kv_cache_usage_ratio") <= 1


def test_a_client_that_leaves_mid_stream_frees_its_sequence(live_server):
    before = scrape(live_server)
    body = {"model": "beta", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{live_server.url}/v1/completions", headers=USER, json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        assert live_server.state.engine.engine.stats().num_running == 1
    wait_idle(live_server)  # running, waiting and KV blocks all back to zero
    after = scrape(live_server)
    aborted = value(after, "loraplex_requests_total", adapter="beta", outcome="abort")
    assert aborted - value(before, "loraplex_requests_total", adapter="beta", outcome="abort") == 1
    generated = value(after, "loraplex_generation_tokens_total", adapter="beta")
    assert generated - value(before, "loraplex_generation_tokens_total", adapter="beta") < 400


def test_a_client_that_leaves_a_non_streaming_request_frees_it(live_server):
    before = scrape(live_server)
    body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 500, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_server.url}/v1/completions", headers=USER, json=body, timeout=0.3)
    wait_idle(live_server)
    aborted = value(scrape(live_server), "loraplex_requests_total", adapter="base", outcome="abort")
    assert aborted - value(before, "loraplex_requests_total", adapter="base", outcome="abort") == 1


@pytest.fixture(scope="module")
def tight_server(demo_dir, tmp_path_factory):
    """One sequence runs at a time, two may wait."""
    config = ServerConfig(max_waiting=2, max_choices=2, metrics_max_adapters=1)
    options = engine_options(demo_dir, tmp_path_factory.mktemp("tight"), max_num_seqs=1)
    with run_server(options, config) as server:
        yield server


def test_a_full_queue_is_a_429_with_retry_after(tight_server):
    engine = tight_server.state.engine.engine
    results: list[int] = []
    busy = [threading.Thread(target=lambda n=n, m=m: results.append(complete(tight_server, "demo", m, n=n).status_code))
            for n, m in ((1, 400), (2, 20))]  # one running a while, then two waiting
    for thread in busy:
        thread.start()
        deadline = time.monotonic() + 10
        while engine.stats().num_running + engine.stats().num_waiting < (1 if thread is busy[0] else 3):
            assert time.monotonic() < deadline, "the requests did not get queued"
            time.sleep(0.005)
    resp = complete(tight_server, "demo")
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["type"] == "rate_limit_error" and "--max-waiting" in resp.json()["error"]["message"]
    assert resp.json()["error"]["code"] == "queue_full"  # the engine's typed OVERLOADED error, mapped by kind
    assert value(scrape(tight_server), "loraplex_requests_total", adapter="base", outcome="rejected") == 1
    for thread in busy:
        thread.join(60)
    assert results == [200, 200], "queued requests are served"
    assert complete(tight_server, "demo", n=2).status_code == 200


def test_adapter_labels_go_to_the_busiest_adapters_and_are_bounded(tight_server):
    # metrics_max_adapters=1: an adapter gets a label while no other was requested more; 2 labels at most
    for model in ("alpha", "alpha", "beta", "gamma", "gamma", "gamma"):
        assert complete(tight_server, model).status_code == 200
    samples = scrape(tight_server)
    adapters = {dict(labels).get("adapter") for (name, labels) in samples if name == "loraplex_requests_total"}
    assert adapters == {"alpha", "gamma", "other", "base"}  # beta never led: it shares `other`

    def count(adapter):
        return value(samples, "loraplex_requests_total", adapter=adapter, outcome="length")

    assert (count("alpha"), count("gamma"), count("other")) == (2, 2, 2)  # gamma's first request was behind
    for _ in range(3):  # beta now leads, but both labels are taken
        assert complete(tight_server, "beta").status_code == 200
    assert value(scrape(tight_server), "loraplex_requests_total", adapter="other", outcome="length") == 5
