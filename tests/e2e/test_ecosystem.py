"""What tools made for other servers need: CORS for browser pages (--allowed-origins), vLLM's metric
names on /metrics, and OpenAI-shaped 404 / 405 answers for unknown routes and wrong methods."""

from __future__ import annotations

import math
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import ADMIN_KEY, API_KEY, engine_options, run_server

from loraplex.config import ServerConfig

USER = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
APP = "https://app.example.com"
OTHER_APP = "http://localhost:5173"
EVIL = "https://evil.example.net"


@pytest.fixture(scope="module")
def cors_server(demo_dir, tmp_path_factory):
    """Keys set, two allowed origins; one sequence runs at a time (so that a second one waits)."""
    config = ServerConfig(api_key=API_KEY, admin_key=ADMIN_KEY, allowed_origins=(APP, OTHER_APP),
                          max_body_size="64KiB")
    options = engine_options(demo_dir, tmp_path_factory.mktemp("cors"), max_num_seqs=1)
    with run_server(options, config) as server:
        yield server


@pytest.fixture(scope="module")
def any_origin_server(demo_dir, tmp_path_factory):
    config = ServerConfig(api_key=API_KEY, allowed_origins=("*",))
    with run_server(engine_options(demo_dir, tmp_path_factory.mktemp("cors-any")), config) as server:
        yield server


def preflight(server, path: str, origin: str, method: str = "POST", headers: str | None = None) -> httpx.Response:
    asked = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        asked["Access-Control-Request-Headers"] = headers
    return httpx.options(f"{server.url}{path}", headers=asked)


def cors_headers(resp: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.startswith("access-control-")}


def listed(value: str) -> set[str]:
    return {part.strip().lower() for part in value.split(",") if part.strip()}


def assert_error_shape(resp: httpx.Response, status: int, error_type: str, code: str | None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["code"]) == (error_type, code)
    return error


def complete_body(model: str = "demo", max_tokens: int = 3, **extra) -> dict:
    return {"model": model, "prompt": "The quick brown fox", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}


# -- CORS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "method"), [
    ("/v1/chat/completions", "POST"), ("/v1/completions", "POST"), ("/v1/models", "GET"),
    ("/v1/adapters/alpha", "DELETE"),  # an admin route: still no key on a preflight
])
def test_a_preflight_from_an_allowed_origin_is_answered_before_the_key_check(cors_server, path, method):
    resp = preflight(cors_server, path, APP, method, headers="authorization, content-type, x-request-id")
    assert resp.status_code == 200, resp.text  # not the gate's 401: browsers send preflights without keys
    assert resp.headers["access-control-allow-origin"] == APP
    assert listed(resp.headers["access-control-allow-methods"]) == {"get", "post", "delete", "options"}
    assert {"authorization", "content-type", "x-request-id"} <= listed(resp.headers["access-control-allow-headers"])
    assert "access-control-allow-credentials" not in resp.headers
    assert preflight(cors_server, path, OTHER_APP, method).headers["access-control-allow-origin"] == OTHER_APP


def test_the_openai_js_sdks_preflight_passes(cors_server):
    asked = "authorization,content-type,x-stainless-os,x-stainless-lang,x-stainless-timeout,x-stainless-retry-count"
    resp = preflight(cors_server, "/v1/chat/completions", APP, headers=asked)
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == APP


def test_answers_to_an_allowed_origin_carry_the_allow_origin_errors_included(cors_server):
    url = cors_server.url
    origin = {"Origin": APP}
    ok = httpx.post(f"{url}/v1/completions", headers={**USER, **origin}, json=complete_body(), timeout=60)
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == APP
    assert {"x-request-id", "retry-after"} <= listed(ok.headers["access-control-expose-headers"])
    assert ok.headers["x-request-id"]
    # The errors a page must be able to read: no key (the gate's 401), the API key on an admin route (403),
    # an unknown model (404), a body over the limit (413, answered by the body limit before any route)
    no_key = httpx.post(f"{url}/v1/completions", headers=origin, json=complete_body())
    assert_error_shape(no_key, 401, "authentication_error", "invalid_api_key")
    forbidden = httpx.delete(f"{url}/v1/adapters/alpha", headers={**USER, **origin})
    assert_error_shape(forbidden, 403, "permission_error", "insufficient_permissions")
    unknown = httpx.post(f"{url}/v1/completions", headers={**USER, **origin}, json=complete_body("nope"))
    assert_error_shape(unknown, 404, "not_found_error", "model_not_found")
    chunks = (b"x" * 32768 for _ in range(4))  # 128 KiB without a Content-Length: refused while it arrives
    too_large = httpx.post(f"{url}/v1/completions", headers={**USER, **origin, "Content-Type": "application/json"},
                           content=chunks)
    assert_error_shape(too_large, 413, "invalid_request_error", "body_too_large")
    for resp in (no_key, forbidden, unknown, too_large):
        assert resp.headers.get("access-control-allow-origin") == APP, resp.status_code


def test_a_disallowed_origin_gets_no_allow_header(cors_server):
    resp = preflight(cors_server, "/v1/chat/completions", EVIL, headers="authorization, content-type")
    error = assert_error_shape(resp, 400, "invalid_request_error", "cors_preflight_refused")
    assert "origin" in error["message"]
    assert cors_headers(resp) == {}  # no Access-Control-Allow-Origin, nor the methods and headers
    # A real request is answered (the key allows it) but not shared with the page: no allow header
    real = httpx.post(f"{cors_server.url}/v1/completions", headers={**USER, "Origin": EVIL}, json=complete_body(),
                      timeout=60)
    assert real.status_code == 200
    assert "access-control-allow-origin" not in real.headers
    # An origin differing only in scheme or port is another origin
    for near in ("http://app.example.com", "https://app.example.com:8443", "http://localhost:5174"):
        assert "access-control-allow-origin" not in preflight(cors_server, "/v1/models", near, "GET").headers


def test_a_preflight_for_a_method_or_header_not_allowed_is_refused(cors_server):
    for resp in (preflight(cors_server, "/v1/completions", APP, "PUT"),
                 preflight(cors_server, "/v1/completions", APP, headers="authorization, x-secret-header")):
        assert_error_shape(resp, 400, "invalid_request_error", "cors_preflight_refused")
        assert "access-control-allow-origin" not in resp.headers


def test_any_origin_with_a_star(any_origin_server):
    resp = preflight(any_origin_server, "/v1/completions", EVIL, headers="authorization, content-type")
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "*"
    no_key = httpx.get(f"{any_origin_server.url}/v1/models", headers={"Origin": EVIL})
    assert no_key.status_code == 401 and no_key.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in no_key.headers


def test_without_allowed_origins_there_is_no_cors(live_server):
    url = live_server.url
    # A preflight is an OPTIONS request like any other: the gate wants a key under /v1/, and no route takes OPTIONS
    resp = preflight(live_server, "/v1/completions", APP, headers="authorization, content-type")
    assert_error_shape(resp, 401, "authentication_error", "invalid_api_key")
    assert cors_headers(resp) == {}
    with_key = httpx.options(f"{url}/v1/completions", headers={**USER, "Origin": APP,
                                                               "Access-Control-Request-Method": "POST"})
    assert_error_shape(with_key, 405, "invalid_request_error", "method_not_allowed")
    assert cors_headers(with_key) == {}
    for resp in (httpx.post(f"{url}/v1/completions", headers={**USER, "Origin": APP}, json=complete_body(),
                            timeout=60),
                 httpx.get(f"{url}/v1/models", headers={"Origin": APP}),
                 httpx.get(f"{url}/health", headers={"Origin": APP})):
        assert resp.status_code in (200, 401)
        assert cors_headers(resp) == {}, resp.request.url


# -- vLLM's metric names ---------------------------------------------------------------------------


def scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of every sample."""
    text = httpx.get(f"{server.url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def vllm(samples, name: str, model: str, **labels) -> float:
    key = (name, tuple(sorted({"model_name": model, "engine": "0", **labels}.items())))
    assert key in samples, f"{name} {labels} is not exported"
    return samples[key]


def summed(samples, name: str, **labels) -> float:
    """The sum over every series of a loraplex metric that has these labels (any adapter)."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def stream(server, model: str, max_tokens: int = 400):
    body = complete_body(model, max_tokens, stream=True)
    return httpx.stream("POST", f"{server.url}/v1/completions", headers=USER, json=body, timeout=60)


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def wait_idle(server) -> None:
    engine = server.state.engine.engine
    wait_for(lambda: (s := engine.stats()).num_running == s.num_waiting == s.kv_blocks_used == 0, "still busy")


HISTOGRAMS = {  # vllm: name -> its loraplex twin
    "vllm:time_to_first_token_seconds": "loraplex_time_to_first_token_seconds",
    "vllm:time_per_output_token_seconds": "loraplex_inter_token_latency_seconds",
    "vllm:inter_token_latency_seconds": "loraplex_inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds": "loraplex_e2e_request_latency_seconds",
}
COUNTERS = {
    "vllm:prompt_tokens_total": "loraplex_prompt_tokens_total",
    "vllm:generation_tokens_total": "loraplex_generation_tokens_total",
}


def test_vllm_counters_and_histograms_move_with_their_loraplex_twins(cors_server):
    model = cors_server.state.base_name
    wait_idle(cors_server)
    before = scrape(cors_server)
    prompt_tokens = 0
    for name in ("alpha", "alpha", "demo", "gamma"):  # adapters and the base model
        resp = httpx.post(f"{cors_server.url}/v1/completions", headers=USER, json=complete_body(name, 5), timeout=60)
        assert resp.status_code == 200, resp.text
        prompt_tokens += resp.json()["usage"]["prompt_tokens"]
    with stream(cors_server, "beta") as s:  # one that the client leaves: an abort
        next(line for line in s.iter_lines() if line.startswith("data: {"))
    wait_idle(cors_server)
    after = scrape(cors_server)

    def delta(name, **labels):
        return vllm(after, name, model, **labels) - vllm(before, name, model, **labels)

    def twin_delta(name, **labels):
        return summed(after, name, **labels) - summed(before, name, **labels)

    assert delta("vllm:generation_tokens_total") == twin_delta("loraplex_generation_tokens_total") >= 4 * 5 + 1
    assert delta("vllm:prompt_tokens_total") == twin_delta("loraplex_prompt_tokens_total") >= prompt_tokens
    for reason, expected in (("length", 4), ("abort", 1), ("stop", 0)):
        assert delta("vllm:request_success_total", finished_reason=reason) == expected
        assert twin_delta("loraplex_requests_total", outcome=reason) == expected
    assert delta("vllm:time_to_first_token_seconds_count") == 5
    assert delta("vllm:e2e_request_latency_seconds_count") == 4  # the abort has no end-to-end latency
    assert delta("vllm:inter_token_latency_seconds_count") >= 4 * 4
    for name, twin in HISTOGRAMS.items():
        buckets = {dict(ls)["le"] for (n, ls) in after if n == f"{twin}_bucket"}
        assert buckets, twin
        for le in buckets:  # every bucket, cumulative as the twin's
            assert delta(f"{name}_bucket", le=le) == twin_delta(f"{twin}_bucket", le=le), (name, le)
        assert delta(f"{name}_count") == twin_delta(f"{twin}_count") > 0
        assert math.isclose(delta(f"{name}_sum"), twin_delta(f"{twin}_sum"), rel_tol=1e-9, abs_tol=1e-12)
    for name, twin in COUNTERS.items():  # the absolute values too, since the start
        assert vllm(after, name, model) == summed(after, twin)


def test_vllm_gauges_and_lora_info_follow_the_engine(cors_server, monkeypatch):
    """max_num_seqs=1: a stream on beta runs, one on gamma waits behind it."""
    model = cors_server.state.base_name
    engine = cors_server.state.engine.engine
    step = engine.step

    def slow_step(*args, **kwargs):  # the demo model is fast: 400 tokens would be gone in a blink
        time.sleep(0.02)
        return step(*args, **kwargs)

    monkeypatch.setattr(engine, "step", slow_step)
    wait_idle(cors_server)
    idle = scrape(cors_server)
    assert vllm(idle, "vllm:num_requests_running", model) == vllm(idle, "vllm:num_requests_waiting", model) == 0
    assert vllm(idle, "vllm:kv_cache_usage_perc", model) == 0
    lora_info = [(dict(ls), v) for (n, ls), v in idle.items() if n == "vllm:lora_requests_info"]
    assert len(lora_info) == 1
    labels, stamp = lora_info[0]
    assert labels == {"max_lora": "4", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert abs(stamp - time.time()) < 60

    def second():
        with stream(cors_server, "gamma", 5) as s:
            for _ in s.iter_lines():
                pass

    with stream(cors_server, "beta") as first:
        lines = first.iter_lines()  # held: an iterator dropped would close the stream (an abort)
        next(line for line in lines if line.startswith("data: {"))
        thread = threading.Thread(target=second)
        thread.start()
        wait_for(lambda: engine.stats().num_waiting == 1, "the second stream did not queue")
        busy = scrape(cors_server)
    thread.join(60)
    wait_idle(cors_server)
    assert vllm(busy, "vllm:num_requests_running", model) == busy[("loraplex_num_requests_running", ())] == 1
    assert vllm(busy, "vllm:num_requests_waiting", model) == busy[("loraplex_num_requests_waiting", ())] == 1
    usage = busy[("loraplex_kv_cache_usage_ratio", ())]
    assert 0 < usage <= 1
    assert vllm(busy, "vllm:kv_cache_usage_perc", model) == vllm(busy, "vllm:gpu_cache_usage_perc", model) == usage
    lora_info = [(dict(ls), v) for (n, ls), v in busy.items() if n == "vllm:lora_requests_info"]
    assert [labels for labels, _ in lora_info] == [
        {"max_lora": "4", "running_lora_adapters": "beta", "waiting_lora_adapters": "gamma"}]


def test_every_vllm_series_is_labelled_with_the_served_model(live_server):
    samples = scrape(live_server)
    names = {n for (n, _) in samples if n.startswith("vllm:")}
    expected = {
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc", *COUNTERS, "vllm:request_success_total", "vllm:lora_requests_info",
        *(f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "count", "sum")),
    }
    assert names == expected
    for (n, ls) in samples:
        if n.startswith("vllm:") and n != "vllm:lora_requests_info":
            labels = dict(ls)
            assert (labels.pop("model_name"), labels.pop("engine")) == (live_server.state.base_name, "0"), n
            assert set(labels) <= {"le", "finished_reason"}, n
    assert {dict(ls)["finished_reason"] for (n, ls) in samples if n == "vllm:request_success_total"} == {
        "stop", "length", "abort"}
    assert any(n.startswith("loraplex_") for (n, _) in samples)  # loraplex's own names stay


# -- unknown routes, wrong methods ---------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "headers"), [
    ("GET", "/v1/nope", USER), ("POST", "/v1/nope", USER), ("GET", "/v1", USER),
    ("GET", "/v1/adapters/alpha/files", USER), ("POST", "/nonexistent", {}), ("GET", "/nonexistent", {}),
])
def test_an_unknown_route_is_a_404_in_openais_shape(live_server, method, path, headers):
    resp = httpx.request(method, f"{live_server.url}{path}", headers=headers, json={"model": "demo"})
    error = assert_error_shape(resp, 404, "not_found_error", "unknown_url")
    assert error["param"] is None
    assert f"{method} {path}" in error["message"]


def test_an_unknown_route_under_v1_needs_the_key_first(live_server):
    resp = httpx.get(f"{live_server.url}/v1/nope")
    assert_error_shape(resp, 401, "authentication_error", "invalid_api_key")


@pytest.mark.parametrize(("method", "path", "headers", "allowed"), [
    ("GET", "/v1/completions", USER, "POST"), ("GET", "/v1/chat/completions", USER, "POST"),
    ("DELETE", "/v1/models", USER, "GET"), ("PUT", "/v1/adapters/alpha", ADMIN, "GET, DELETE"),
    ("POST", "/health", {}, "GET"), ("DELETE", "/metrics", {}, "GET"),
])
def test_a_wrong_method_is_a_405_in_openais_shape(live_server, method, path, headers, allowed):
    resp = httpx.request(method, f"{live_server.url}{path}", headers=headers)
    error = assert_error_shape(resp, 405, "invalid_request_error", "method_not_allowed")
    assert (error["message"], error["param"]) == ("Method Not Allowed", None)
    assert listed(resp.headers["allow"]) == listed(allowed)
