"""The load generator (loadtest/) against a live demo server: what it counts is what the server counted.

A short streaming run (Poisson arrivals, three adapters uploaded from the demo's `alpha` under three
names) whose JSON result must agree with the deltas of the server's /metrics: successful requests with
`loraplex_requests_total` (summed over outcomes, and per adapter), output tokens with
`loraplex_generation_tokens_total`, prompt tokens with `loraplex_prompt_tokens_total`. The uploads are
gone afterwards, and a non-loopback --base-url is refused before anything is sent.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families
from server_harness import ADMIN_KEY, API_KEY

from loadtest.cli import main as loadtest_main


def scrape(server) -> dict[str, dict[tuple, float]]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def wait_idle(server, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(server)
        if m["loraplex_num_requests_running"].get((), 0) == 0 and m["loraplex_num_requests_waiting"].get((), 0) == 0:
            return
        assert time.monotonic() < deadline, "the server did not go idle"
        time.sleep(0.05)


def total(m, name: str) -> float:
    return sum(m[name].values())


def by_adapter(m, name: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for labels, v in m[name].items():
        out[dict(labels)["adapter"]] += v
    return out


def test_loadtest_counts_match_the_server_metrics(live_server, demo_dir, tmp_path, capsys):
    result_path = tmp_path / "result.json"
    wait_idle(live_server)
    before = scrape(live_server)
    rc = loadtest_main([
        "--base-url", f"{live_server.url}/v1", "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
        "--adapters-from", str(demo_dir / "adapters" / "alpha"), "--num-adapters", "3", "--popularity", "zipf:1",
        "--arrival", "poisson", "--rate", "3", "--duration", "8", "--prompt-len", "8-24", "--output-len", "4-12",
        "--ignore-eos", "--slo-ttft", "5", "--seed", "7", "--timeout", "60", "--output", str(result_path), "--quiet",
    ])
    assert rc == 0
    wait_idle(live_server)
    after = scrape(live_server)
    result = json.loads(result_path.read_text())
    s = result["summary"]

    assert s["requests"] >= 10  # ~24 expected at 3/s over 8 s
    assert s["failed"] == 0, s["errors"]
    assert s["ok"] == total(after, "loraplex_requests_total") - total(before, "loraplex_requests_total")
    assert s["output_tokens"] == (total(after, "loraplex_generation_tokens_total")
                                  - total(before, "loraplex_generation_tokens_total"))
    assert s["prompt_tokens"] == (total(after, "loraplex_prompt_tokens_total")
                                  - total(before, "loraplex_prompt_tokens_total"))
    # --ignore-eos: every request ran to its drawn max_tokens
    assert s["output_tokens"] == s["output_tokens_planned"]
    assert s["finish_reasons"] == {"length": s["ok"]}
    # the adapters the schedule drew are the ones the server ran
    server_counts = {a: after_n - by_adapter(before, "loraplex_requests_total").get(a, 0)
                     for a, after_n in by_adapter(after, "loraplex_requests_total").items()}
    assert {a: n for a, n in server_counts.items() if n} == s["per_adapter"]
    assert set(s["per_adapter"]) <= {"lt-0", "lt-1", "lt-2"}
    # streamed figures are there
    assert s["ttft_ms"]["count"] == s["ok"] and s["itl_ms"]["count"] > 0 and s["slo"]["met"] == s["ok"]
    assert result["server"] == f"{live_server.url}/v1" and result["workload"]["seed"] == 7
    # the uploads were removed
    listed = httpx.get(f"{live_server.url}/v1/adapters", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert not [a["id"] for a in listed["data"] if a["id"].startswith("lt-")]
    assert f"{s['requests']} sent, {s['ok']} ok" in capsys.readouterr().out


def test_loadtest_refuses_a_remote_server(live_server, capsys):
    before = scrape(live_server)["loraplex_requests_total"]
    rc = loadtest_main(["--base-url", "http://198.51.100.10:8000/v1", "--max-requests", "3", "--quiet"])
    assert rc == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert scrape(live_server)["loraplex_requests_total"] == before
