"""The load generator's schedule: arrival processes, adapter popularity, lengths, seeds and traces."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loadtest.workload import (
    WORDS,
    Lengths,
    Popularity,
    Workload,
    WorkloadError,
    make_schedule,
    read_trace,
    synthetic_prompt,
)


def gaps(schedule) -> np.ndarray:
    times = np.array([p.time for p in schedule])
    assert np.all(np.diff(times) >= 0), "arrival times must not go back"
    return np.diff(np.concatenate([[0.0], times]))


def cv(x: np.ndarray) -> float:
    return float(x.std() / x.mean())


def chi_square(counts: np.ndarray, pmf: np.ndarray) -> float:
    expected = counts.sum() * pmf
    return float(((counts - expected) ** 2 / expected).sum())


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at 1 - p for the normal quantile z (3.09: p = 0.001), by Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_chi_square_critical_is_right():
    # tabulated 0.999 quantiles
    assert chi_square_critical(9) == pytest.approx(27.88, rel=0.02)
    assert chi_square_critical(19) == pytest.approx(43.82, rel=0.02)


@pytest.mark.parametrize("rate", [0.5, 5.0, 40.0])
def test_poisson_gaps_have_mean_one_over_rate_and_cv_one(rate):
    schedule = make_schedule(Workload(arrival="poisson", rate=rate, max_requests=20_000, seed=3))
    g = gaps(schedule)
    assert len(g) == 20_000
    assert g.mean() == pytest.approx(1 / rate, rel=0.03)
    assert cv(g) == pytest.approx(1.0, abs=0.03)
    # exponential: P(gap > mean) = 1/e
    assert np.mean(g > 1 / rate) == pytest.approx(math.exp(-1), abs=0.015)


def test_poisson_with_a_duration_stops_at_it():
    schedule = make_schedule(Workload(arrival="poisson", rate=20.0, duration=100.0, seed=1))
    times = [p.time for p in schedule]
    assert max(times) <= 100.0
    # the count of a Poisson process over 100 s at 20/s: mean 2000, sd ~45
    assert abs(len(schedule) - 2000) < 5 * math.sqrt(2000)
    # a request cap cuts the same arrivals short
    capped = make_schedule(Workload(arrival="poisson", rate=20.0, duration=100.0, max_requests=50, seed=1))
    assert [p.time for p in capped] == times[:50]


@pytest.mark.parametrize("target_cv", [0.5, 2.0, 4.0])
def test_gamma_gaps_have_the_asked_cv_and_mean(target_cv):
    rate = 4.0
    schedule = make_schedule(Workload(arrival="gamma", rate=rate, cv=target_cv, max_requests=40_000, seed=7))
    g = gaps(schedule)
    assert g.mean() == pytest.approx(1 / rate, rel=0.05)
    assert cv(g) == pytest.approx(target_cv, rel=0.07)


def test_gamma_with_cv_one_is_poisson_like():
    g = gaps(make_schedule(Workload(arrival="gamma", rate=2.0, cv=1.0, max_requests=20_000, seed=5)))
    assert cv(g) == pytest.approx(1.0, abs=0.03)


def test_closed_loop_schedule_has_no_times():
    schedule = make_schedule(Workload(arrival="concurrency", concurrency=4, max_requests=100, seed=0))
    assert len(schedule) == 100
    assert all(p.time is None for p in schedule)
    assert [p.index for p in schedule] == list(range(100))


def adapter_counts(popularity: Popularity, n: int, count: int = 30_000, seed: int = 11) -> np.ndarray:
    schedule = make_schedule(Workload(num_adapters=n, popularity=popularity, arrival="concurrency",
                                      max_requests=count, seed=seed))
    return np.bincount([p.adapter for p in schedule], minlength=n)


def test_zipf_pmf_follows_the_exponent():
    pmf = Popularity("zipf", 1.3).pmf(50)
    assert pmf.sum() == pytest.approx(1.0)
    ranks = np.arange(1, 51)
    # log p_k = -s log k + c: the exponent is the slope
    slope = np.polyfit(np.log(ranks), np.log(pmf), 1)[0]
    assert slope == pytest.approx(-1.3, abs=1e-9)
    assert pmf[0] / pmf[1] == pytest.approx(2 ** 1.3)


@pytest.mark.parametrize("s", [0.8, 1.2, 2.0])
def test_zipf_frequencies_follow_the_exponent(s):
    n = 10
    counts = adapter_counts(Popularity("zipf", s), n)
    pmf = Popularity("zipf", s).pmf(n)
    assert chi_square(counts, pmf) < chi_square_critical(n - 1)
    # the top ranks within 4 binomial standard deviations of their probability
    total = counts.sum()
    for k in range(3):
        sd = math.sqrt(pmf[k] * (1 - pmf[k]) / total)
        assert abs(counts[k] / total - pmf[k]) < 4 * sd, k
    # and the test has the power to tell a neighbouring exponent apart
    for other in (s - 0.2, s + 0.2):
        assert chi_square(counts, Popularity("zipf", other).pmf(n)) > chi_square_critical(n - 1)


def test_uniform_popularity_is_uniform():
    n = 20
    counts = adapter_counts(Popularity("uniform"), n)
    assert chi_square(counts, np.full(n, 1 / n)) < chi_square_critical(n - 1)
    assert np.array_equal(Popularity("zipf", 0.0).pmf(n), np.full(n, 1 / n))


def test_slora_pmf_is_the_power_law_of_s_lora():
    n, alpha = 8, 0.3
    pmf = Popularity("slora", alpha).pmf(n)
    expected = [((i + 1) / n) ** alpha - (i / n) ** alpha for i in range(n)]
    assert np.allclose(pmf, expected)
    assert pmf.sum() == pytest.approx(1.0)
    assert np.all(np.diff(pmf) < 0), "alpha < 1 favours the first adapters"
    assert np.allclose(Popularity("slora", 1.0).pmf(n), 1 / n)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_slora_frequencies_match_s_lora_sampler(alpha):
    """S-LoRA draws index = int(n * numpy.random.power(alpha)); ours must have that distribution."""
    n = 10
    ours = adapter_counts(Popularity("slora", alpha), n)
    theirs = np.bincount((np.random.default_rng(99).power(alpha, 30_000) * n).astype(int), minlength=n)
    pmf = Popularity("slora", alpha).pmf(n)
    assert chi_square(ours, pmf) < chi_square_critical(n - 1)
    assert chi_square(theirs, pmf) < chi_square_critical(n - 1)


def test_popularity_specs():
    assert Popularity.parse("uniform") == Popularity("uniform", 1.0)
    assert Popularity.parse("zipf") == Popularity("zipf", 1.0)
    assert Popularity.parse("zipf:1.5") == Popularity("zipf", 1.5)
    assert Popularity.parse("slora:0.1") == Popularity("slora", 0.1)
    for bad in ("pareto", "zipf:x", "zipf:-1", "slora:0", "uniform:2"):
        with pytest.raises(WorkloadError):
            Popularity.parse(bad)


def test_base_model_only_without_adapters():
    schedule = make_schedule(Workload(num_adapters=0, max_requests=10, arrival="concurrency"))
    assert {p.adapter for p in schedule} == {-1}


def test_uniform_lengths_stay_within_bounds_with_the_right_mean():
    schedule = make_schedule(Workload(prompt_len=Lengths("uniform", 10, 50), output_len=Lengths("uniform", 3, 7),
                                      arrival="concurrency", max_requests=20_000, seed=2))
    prompts = np.array([p.prompt_tokens for p in schedule])
    outputs = np.array([p.output_tokens for p in schedule])
    assert prompts.min() == 10 and prompts.max() == 50  # both ends included
    assert outputs.min() == 3 and outputs.max() == 7
    # uniform on lo..hi: mean (lo+hi)/2, sd sqrt(((hi-lo+1)^2 - 1) / 12)
    sd = math.sqrt((41 ** 2 - 1) / 12)
    assert abs(prompts.mean() - 30) < 4 * sd / math.sqrt(len(prompts))
    assert outputs.mean() == pytest.approx(5.0, abs=0.05)
    assert chi_square(np.bincount(outputs - 3, minlength=5), np.full(5, 0.2)) < chi_square_critical(4)


def test_fixed_lengths_and_length_specs():
    schedule = make_schedule(Workload(prompt_len=Lengths.parse("17"), output_len=Lengths.parse("5"),
                                      arrival="concurrency", max_requests=50))
    assert {(p.prompt_tokens, p.output_tokens) for p in schedule} == {(17, 5)}
    assert Lengths.parse("8-32") == Lengths("uniform", 8, 32)
    for bad in ("0", "9-3", "a-b", "", "1.5"):
        with pytest.raises(WorkloadError):
            Lengths.parse(bad)


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another():
    def workload(seed):
        return Workload(num_adapters=16, popularity=Popularity("zipf", 1.1), arrival="gamma", rate=3.0, cv=2.0,
                        prompt_len=Lengths("uniform", 1, 500), output_len=Lengths("uniform", 1, 500),
                        duration=60.0, seed=seed)

    a, b, c = make_schedule(workload(42)), make_schedule(workload(42)), make_schedule(workload(43))
    assert a == b
    assert [p.time for p in a] != [p.time for p in c[: len(a)]]
    assert [p.adapter for p in a[:100]] != [p.adapter for p in c[:100]]
    assert [p.prompt_tokens for p in a[:100]] != [p.prompt_tokens for p in c[:100]]
    assert [p.output_tokens for p in a[:100]] != [p.output_tokens for p in c[:100]]


def test_a_rate_sweep_scales_the_same_arrivals_and_keeps_the_rest():
    slow = make_schedule(Workload(num_adapters=8, rate=1.0, max_requests=200, seed=9,
                                  prompt_len=Lengths("uniform", 1, 100)))
    fast = make_schedule(Workload(num_adapters=8, rate=4.0, max_requests=200, seed=9,
                                  prompt_len=Lengths("uniform", 1, 100)))
    assert np.allclose([p.time for p in slow], [4 * p.time for p in fast])
    assert [(p.adapter, p.prompt_tokens) for p in slow] == [(p.adapter, p.prompt_tokens) for p in fast]


def test_trace_lengths_are_replayed_in_order(tmp_path):
    trace = tmp_path / "lengths.jsonl"
    pairs = [(12, 3), (250, 40), (7, 1), (64, 64)]
    trace.write_text("\n".join(json.dumps({"prompt_tokens": p, "output_tokens": o, "note": "x"}) for p, o in pairs)
                     + "\n\n")
    lines = read_trace(trace)
    assert lines == tuple(pairs)
    schedule = make_schedule(Workload(prompt_len=Lengths("trace"), output_len=Lengths("trace"), trace=lines,
                                      arrival="concurrency", max_requests=10))
    assert [(p.prompt_tokens, p.output_tokens) for p in schedule] == (pairs * 3)[:10]


@pytest.mark.parametrize("line", ['{"prompt_tokens": 3}', '{"prompt_tokens": 0, "output_tokens": 2}',
                                  '{"prompt_tokens": "3", "output_tokens": 2}', "not json", "[1, 2]"])
def test_a_bad_trace_line_is_refused_with_its_line_number(tmp_path, line):
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"prompt_tokens": 3, "output_tokens": 2}\n' + line + "\n")
    with pytest.raises(WorkloadError, match=":2:"):
        read_trace(trace)


def test_bad_workloads_are_refused():
    for kwargs in ({"rate": 0.0}, {"arrival": "gamma", "cv": 0.0}, {"arrival": "uniform"},
                   {"arrival": "concurrency", "concurrency": 0}, {"max_requests": None, "duration": None},
                   {"duration": -1.0}, {"num_adapters": -1}, {"prompt_len": Lengths("trace")}):
        with pytest.raises(WorkloadError):
            Workload(**{"max_requests": 10, **kwargs})


def test_synthetic_prompts_have_the_word_count_and_differ_per_request():
    text = synthetic_prompt(37, seed=1, index=5)
    assert len(text.split()) == 37
    assert all(w in WORDS for w in text.split())
    assert text == synthetic_prompt(37, seed=1, index=5)
    assert text != synthetic_prompt(37, seed=1, index=6)
    assert text != synthetic_prompt(37, seed=2, index=5)
