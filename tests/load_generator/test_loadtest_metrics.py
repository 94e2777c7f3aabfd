"""The load generator's figures from hand-made request records: percentiles, throughput, SLO, goodput."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.metrics import RequestRecord, distribution, elapsed_of, summarize


def rec(i, *, ok=True, start=0.0, ttft=None, e2e=None, itl=(), out=0, prompt=10, error=None, adapter="a",
        scheduled=None, streamed=True):
    r = RequestRecord(i, adapter, scheduled, prompt, out, start=start, ttft=ttft, e2e=e2e, itl=list(itl),
                      prompt_tokens=prompt if ok else None, output_tokens=out, usage_reported=ok, ok=ok, error=error,
                      streamed=streamed, finish_reason="length" if ok else None)
    return r


RECORDS = [
    rec(0, start=0.0, ttft=0.10, e2e=0.50, itl=[0.1, 0.1, 0.1, 0.1], out=5, scheduled=0.0),
    rec(1, start=0.5, ttft=0.30, e2e=1.10, itl=[0.2, 0.2, 0.2, 0.2], out=5, adapter="b", scheduled=0.45),
    rec(2, start=1.0, ttft=0.05, e2e=0.20, itl=[0.05, 0.05, 0.05], out=4, scheduled=1.0),
    rec(3, start=1.5, ttft=0.90, e2e=2.00, itl=[0.55, 0.55], out=3, adapter="c", scheduled=1.2),
    rec(4, start=2.0, ttft=0.20, e2e=0.60, itl=[0.4], out=2, scheduled=2.0),
    rec(5, ok=False, start=2.5, e2e=0.01, error="http_429", scheduled=2.5),
    rec(6, ok=False, start=3.0, ttft=0.05, e2e=3.00, error="timeout", out=0, scheduled=3.0),
    rec(7, ok=False, start=3.5, e2e=0.02, error="http_429", adapter="b", scheduled=3.5),
]
OK = RECORDS[:5]


def test_percentiles_are_numpys_over_the_successful_requests():
    s = summarize(RECORDS)
    ttft = [r.ttft for r in OK]
    e2e = [r.e2e for r in OK]
    itl = [g for r in OK for g in r.itl]
    for key, values in (("ttft_ms", ttft), ("e2e_ms", e2e), ("itl_ms", itl)):
        d = s[key]
        assert d["count"] == len(values)
        for p in (50, 90, 99):
            assert d[f"p{p}"] == pytest.approx(np.percentile(values, p) * 1000), (key, p)
        assert d["mean"] == pytest.approx(np.mean(values) * 1000)
        assert d["max"] == pytest.approx(max(values) * 1000)
    # the failed timeout's TTFT (0.05) is not among them
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)


def test_tpot_per_request():
    s = summarize(RECORDS)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in OK]
    assert s["tpot_ms"]["p50"] == pytest.approx(np.percentile(tpot, 50) * 1000)
    assert s["tpot_ms"]["count"] == 5
    # not streamed: TTFT is e2e, no TPOT
    assert rec(0, ttft=1.0, e2e=1.0, out=9, streamed=False).tpot is None


def test_counts_throughput_and_errors():
    s = summarize(RECORDS)
    elapsed = 3.0 + 3.0  # the timed-out request ends last
    assert elapsed_of(RECORDS) == pytest.approx(elapsed)
    assert s["elapsed_s"] == pytest.approx(elapsed)
    assert (s["requests"], s["ok"], s["failed"]) == (8, 5, 3)
    assert s["errors"] == {"http_429": 2, "timeout": 1}
    assert s["output_tokens"] == 5 + 5 + 4 + 3 + 2
    assert s["prompt_tokens"] == 50
    assert s["request_throughput"] == pytest.approx(5 / elapsed)
    assert s["output_throughput"] == pytest.approx(19 / elapsed)
    assert s["per_adapter"] == {"a": 5, "b": 2, "c": 1}
    assert s["finish_reasons"] == {"length": 5}
    # the lag behind the schedule: 0.05 and 0.3 for two of them, 0 for the rest
    assert s["lag_ms"]["max"] == pytest.approx(300.0)
    assert s["lag_ms"]["mean"] == pytest.approx((50 + 300) / 8)


def test_an_explicit_elapsed_is_used():
    s = summarize(RECORDS, elapsed=10.0)
    assert s["request_throughput"] == pytest.approx(0.5)


@pytest.mark.parametrize(("slo", "met"), [(0.25, 3), (0.1, 2), (1.0, 5), (0.01, 0)])
def test_slo_attainment_and_goodput(slo, met):
    s = summarize(RECORDS, slo_ttft=slo)
    # met among the successful requests; the failures (one with a fast TTFT) never count
    assert s["slo"]["met"] == met
    assert s["slo"]["attainment"] == pytest.approx(met / 8)
    assert s["slo"]["goodput"] == pytest.approx(met / 6.0)
    assert "slo" not in summarize(RECORDS)


def test_empty_and_all_failed_runs():
    s = summarize([])
    assert s["requests"] == 0 and s["request_throughput"] == 0.0
    assert s["ttft_ms"] == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    failed = summarize(RECORDS[5:], slo_ttft=1.0)
    assert failed["ok"] == 0 and failed["slo"]["attainment"] == 0.0 and failed["output_tokens"] == 0


def test_distribution_in_milliseconds():
    d = distribution([0.001, 0.002, 0.003, 0.004])
    assert d == {"count": 4, "mean": pytest.approx(2.5), "p50": pytest.approx(2.5),
                 "p90": pytest.approx(np.percentile([1, 2, 3, 4], 90)), "p99": pytest.approx(3.97),
                 "max": pytest.approx(4.0)}
