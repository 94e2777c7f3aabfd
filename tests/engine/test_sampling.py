"""SamplingParams validation, `apply_filters` (top-k, top-p, min-p) and the batched `Sampler`."""

from __future__ import annotations

import math

import pytest
import torch

from loraplex.engine.sampling import Sampler, SamplingParams, apply_filters
from loraplex.errors import ErrorKind, LoraplexError

CPU = torch.device("cpu")


def kept(probs: list[float], top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> list[int]:
    """Indices of the tokens `apply_filters` leaves finite, for one row given as probabilities."""
    logits = torch.tensor([probs], dtype=torch.float32).log()
    out = apply_filters(logits, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))
    assert out.shape == logits.shape
    finite = torch.isfinite(out[0])
    # what survives keeps its value: the filters mask, they do not rescale
    assert torch.equal(out[0][finite], logits[0][finite])
    return finite.nonzero().flatten().tolist()


P4 = [0.5, 0.3, 0.15, 0.05]


# -- SamplingParams --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", float("nan")),
        ("top_k", -2),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("stop", [""]),
        ("stop", ["ok", 3]),
        ("logprobs", -1),
        ("logprobs", 21),
    ],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(LoraplexError, match=rf"^{field}: ") as info:
        SamplingParams(**{field: value})
    assert info.value.field == field and info.value.kind is ErrorKind.INVALID


def test_valid_sampling_params_edges():
    SamplingParams(max_tokens=1, temperature=0, top_p=1.0, top_k=-1, min_p=1.0, logprobs=20)
    SamplingParams(top_k=0, min_p=0.0, logprobs=0, top_p=1e-9)
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=0.5).greedy


def test_the_choices_of_a_request_share_its_params():
    params = SamplingParams(seed=7, stop=["###"], stop_token_ids=list(range(1000)))
    choices = [params.for_choice(j) for j in range(64)]
    assert [c.seed for c in choices] == list(range(7, 71)), "n choices differ but repeat"
    assert all(c.stop_token_ids is params.stop_token_ids and c.stop is params.stop for c in choices)
    eos = (2, 5000)
    stop = params.stop_token_set(eos)
    assert stop == frozenset(range(1000)) | {5000}
    assert all(c.stop_token_set(eos) is stop for c in choices), "one set for the request, not one per choice"
    unseeded = SamplingParams()
    assert unseeded.for_choice(3) is unseeded


def test_stop_token_set_leaves_out_eos_when_ignored():
    assert SamplingParams(stop_token_ids=[4], ignore_eos=True).stop_token_set((2,)) == {4}
    assert SamplingParams(stop_token_ids=[4]).stop_token_set((2,)) == {2, 4}


# -- apply_filters ---------------------------------------------------------------------------


def test_filters_off_keep_everything():
    assert kept(P4) == [0, 1, 2, 3]
    assert kept(P4, top_k=-1) == [0, 1, 2, 3]
    assert kept(P4, top_k=4) == [0, 1, 2, 3]
    assert kept(P4, top_k=100) == [0, 1, 2, 3]


def test_top_k_keeps_the_k_most_likely():
    probs = [0.1, 0.4, 0.05, 0.3, 0.15]
    assert kept(probs, top_k=1) == [1]
    assert kept(probs, top_k=2) == [1, 3]
    assert kept(probs, top_k=3) == [1, 3, 4]


def test_top_k_keeps_ties_with_the_kth():
    assert kept([0.3, 0.3, 0.2, 0.2], top_k=1) == [0, 1]
    assert kept([0.1, 0.3, 0.2, 0.2, 0.2], top_k=3) == [1, 2, 3, 4]
    assert kept([0.1, 0.3, 0.2, 0.2, 0.2], top_k=2) == [1, 2, 3, 4]


def test_top_p_keeps_the_smallest_prefix_that_reaches_top_p():
    assert kept(P4, top_p=0.8) == [0, 1]  # 0.5 + 0.3 reaches 0.8 exactly
    assert kept(P4, top_p=0.81) == [0, 1, 2]
    assert kept(P4, top_p=0.79) == [0, 1]
    assert kept(P4, top_p=0.5) == [0]
    assert kept(P4, top_p=0.51) == [0, 1]
    assert kept(P4, top_p=0.96) == [0, 1, 2, 3]


def test_top_p_does_not_depend_on_token_order():
    order = [2, 0, 3, 1]  # token i gets probability P4[order[i]]
    probs = [P4[j] for j in order]
    assert kept(probs, top_p=0.8) == sorted(i for i, j in enumerate(order) if j in (0, 1))
    assert kept(probs, top_p=0.81) == sorted(i for i, j in enumerate(order) if j in (0, 1, 2))


def test_top_p_always_keeps_the_top_token():
    assert kept(P4, top_p=1e-9) == [0]
    assert kept([0.05, 0.15, 0.3, 0.5], top_p=1e-6) == [3]
    # 1e-50 is a valid top_p in Python but 0.0 in fp32: the top token must still stay
    assert kept([0.05, 0.15, 0.3, 0.5], top_p=1e-50) == [3]


def test_a_top_p_that_is_zero_in_fp32_samples_the_top_token():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]] * 8)
    params = [SamplingParams(top_p=1e-50, seed=s) for s in range(8)]
    out = Sampler(CPU, seed=0)(logits, params, [torch.Generator().manual_seed(s) for s in range(8)])
    assert out.token_ids == [2] * 8


def test_top_p_keeps_tokens_tied_at_the_boundary():
    assert kept([0.4, 0.2, 0.2, 0.2], top_p=0.5) == [0, 1, 2, 3]


def test_top_p_one_keeps_every_token_of_a_large_vocabulary():
    # top_p = 1.0 is "off" (the default). fp32 cumulative sums over a large vocabulary reach 1.0
    # before the tail: the filter must still not drop any token.
    gen = torch.Generator().manual_seed(0)
    vocab = 32000
    logits = torch.randn(2, vocab, generator=gen) * 3
    out = apply_filters(logits, torch.zeros(2, dtype=torch.long), torch.ones(2), torch.zeros(2))
    dropped = (~torch.isfinite(out)).sum(dim=-1).tolist()
    assert dropped == [0, 0], f"top_p=1.0 dropped {dropped} tokens"


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability():
    assert kept(P4, min_p=0.31) == [0, 1]  # 0.15 < 0.155
    assert kept(P4, min_p=0.29) == [0, 1, 2]  # 0.15 >= 0.145, 0.05 < 0.145
    assert kept([0.5, 0.25, 0.2, 0.05], min_p=0.5) == [0, 1]  # 0.25 >= 0.5 * 0.5
    assert kept([0.5, 0.25, 0.2, 0.05], min_p=0.3) == [0, 1, 2]  # 0.2 >= 0.15, 0.05 < 0.15
    assert kept(P4, min_p=1.0) == [0]
    assert kept([0.4, 0.4, 0.2], min_p=1.0) == [0, 1]
    assert kept(P4, min_p=0.0) == [0, 1, 2, 3]


def test_filters_combine():
    probs = [0.35, 0.25, 0.2, 0.1, 0.06, 0.04]
    # top-k 4 renormalises to [0.35, 0.25, 0.2, 0.1] / 0.9; top-p 0.6 of that: 0.389 + 0.278 >= 0.6
    assert kept(probs, top_k=4, top_p=0.6) == [0, 1]
    # the first two only reach 0.667 of the renormalised mass: a third is needed for 0.7
    assert kept(probs, top_k=4, top_p=0.7) == [0, 1, 2]
    # min-p after top-k: 0.1 < 0.35 * 0.3 = 0.105
    assert kept(probs, top_k=5, min_p=0.3) == [0, 1, 2]
    assert kept(probs, top_k=2, top_p=1.0, min_p=0.0) == [0, 1]
    assert kept(probs, top_k=3, top_p=0.95, min_p=0.6) == [0, 1]  # 0.2 < 0.21
    # top-p measures the mass after top-k: of [0.5, 0.3] renormalised the first is 0.625 >= 0.55
    assert kept(P4, top_k=2, top_p=0.55) == [0]
    assert kept(P4, top_k=0, top_p=0.55) == [0, 1]


def test_rows_with_different_settings_in_one_call():
    rows = [
        [0.5, 0.3, 0.15, 0.05],
        [0.05, 0.15, 0.3, 0.5],
        [0.25, 0.25, 0.25, 0.25],
        [0.1, 0.2, 0.3, 0.4],
        [0.5, 0.3, 0.15, 0.05],
    ]
    top_k = torch.tensor([0, 2, 0, 0, 1])
    top_p = torch.tensor([0.8, 1.0, 1.0, 1.0, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.7, 0.0])
    out = apply_filters(torch.tensor(rows).log(), top_k, top_p, min_p)
    finite = [torch.isfinite(row).nonzero().flatten().tolist() for row in out]
    assert finite == [[0, 1], [2, 3], [0, 1, 2, 3], [2, 3], [0]]
    # each row alone gives the same answer
    for i, row in enumerate(rows):
        alone = apply_filters(torch.tensor([row]).log(), top_k[i : i + 1], top_p[i : i + 1], min_p[i : i + 1])
        assert torch.isfinite(alone[0]).nonzero().flatten().tolist() == finite[i]


# -- Sampler ---------------------------------------------------------------------------------


def sample(logits: torch.Tensor, params: list[SamplingParams], generators=None, seed: int = 0):
    sampler = Sampler(CPU, seed)
    return sampler(logits, params, generators or [None] * len(params))


def test_greedy_is_argmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=gen)
    result = sample(logits, [SamplingParams(temperature=0)] * 6)
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.logprobs is None and result.top_logprobs is None


def test_greedy_breaks_ties_by_the_lowest_token_id():
    logits = torch.zeros(3, 4096)
    logits[0, [7, 900, 4000]] = 5.0
    logits[1, [4095, 3]] = 2.0
    result = sample(logits, [SamplingParams(temperature=0)] * 3)
    assert result.token_ids == [7, 3, 0]


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 50, generator=gen)
    params = [SamplingParams(temperature=0 if i % 2 else 1.5) for i in range(8)]
    for seed in range(20):
        result = sample(logits, params, seed=seed)
        for row in range(1, 8, 2):
            assert result.token_ids[row] == logits[row].argmax().item()


def test_top_k_one_is_greedy_even_at_high_temperature():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 100, generator=gen)
    result = sample(logits, [SamplingParams(temperature=5.0, top_k=1)] * 16)
    assert result.token_ids == logits.argmax(dim=-1).tolist()


def test_filtered_tokens_are_never_sampled():
    logits = torch.tensor([[3.0, 2.9, 2.8, 2.7, -1.0, -1.0]]).repeat(2000, 1)
    result = sample(logits, [SamplingParams(temperature=2.0, top_k=2)] * 2000)
    assert set(result.token_ids) == {0, 1}
    result = sample(logits, [SamplingParams(temperature=1.0, min_p=0.5)] * 2000)
    assert set(result.token_ids) <= {0, 1, 2, 3}


def seeded_token(logits_row, seed, others: torch.Tensor, position: int, other_params) -> int:
    batch = torch.cat([others[:position], logits_row.unsqueeze(0), others[position:]])
    params = list(other_params[:position]) + [SamplingParams(seed=seed)] + list(other_params[position:])
    generators = [None] * len(params)
    generators[position] = torch.Generator().manual_seed(seed)
    return sample(batch, params, generators, seed=position * 7 + len(params)).token_ids[position]


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    gen = torch.Generator().manual_seed(4)
    row = torch.randn(64, generator=gen) * 0.5  # flat: the seed decides
    others = torch.randn(6, 64, generator=gen)
    other_params = [
        SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=3),
        SamplingParams(top_p=0.5, temperature=0.7), SamplingParams(seed=99), SamplingParams(min_p=0.2),
    ]
    for seed in range(10):
        expected = seeded_token(row, seed, others[:0], 0, [])
        for count in (1, 3, 6):
            for position in (0, count // 2, count):
                got = seeded_token(row, seed, others[:count], position, other_params[:count])
                assert got == expected, f"seed {seed}: batch of {count + 1}, row {position}"


def test_a_seeded_generator_advances_per_step():
    # One request's generator across steps: a sequence of draws, reproducible from the seed.
    gen = torch.Generator().manual_seed(5)
    row = (torch.randn(1, 64, generator=gen) * 0.5)

    def draws(seed):
        generator = torch.Generator().manual_seed(seed)
        sampler = Sampler(CPU, 0)
        return [sampler(row, [SamplingParams(seed=seed)], [generator]).token_ids[0] for _ in range(30)]

    assert draws(11) == draws(11)
    assert len(set(draws(11))) > 1


def test_different_seeds_give_different_tokens():
    gen = torch.Generator().manual_seed(6)
    row = torch.randn(64, generator=gen) * 0.5
    tokens = [seeded_token(row, seed, row.new_zeros(0, 64), 0, []) for seed in range(200)]
    assert len(set(tokens)) > 20


def test_unseeded_rows_differ_across_rows():
    row = torch.zeros(1, 64)
    result = sample(row.repeat(500, 1), [SamplingParams()] * 500)
    assert len(set(result.token_ids)) > 40


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square critical values at p = 1e-4, by degrees of freedom
CHI2_CRIT = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74}
DRAWS = 20000


def empirical(logits_row: torch.Tensor, params: SamplingParams, seed: int = 0) -> torch.Tensor:
    result = sample(logits_row.unsqueeze(0).repeat(DRAWS, 1), [params] * DRAWS, seed=seed)
    return torch.bincount(torch.tensor(result.token_ids), minlength=logits_row.numel()).double()


def test_unseeded_sampling_matches_the_probabilities():
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05], dtype=torch.float64)
    counts = empirical(probs.log().float(), SamplingParams())
    assert chi_square(counts, probs) < CHI2_CRIT[4], counts.tolist()


def test_seeded_sampling_matches_the_probabilities():
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05], dtype=torch.float64)
    logits = probs.log().float().unsqueeze(0)
    counts = torch.zeros(5, dtype=torch.float64)
    for seed in range(3000):
        generator = torch.Generator().manual_seed(seed)
        counts[sample(logits, [SamplingParams(seed=seed)], [generator]).token_ids[0]] += 1
    assert chi_square(counts, probs) < CHI2_CRIT[4], counts.tolist()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_the_logits(temperature):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    probs = (logits.double() / temperature).softmax(dim=-1)
    counts = empirical(logits, SamplingParams(temperature=temperature))
    assert chi_square(counts, probs) < CHI2_CRIT[4], counts.tolist()
    untempered = logits.double().softmax(dim=-1)
    assert chi_square(counts, untempered) > 100  # it really differs from temperature 1


def test_top_k_and_top_p_sampling_renormalise_over_what_is_kept():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    counts = empirical(probs.log().float(), SamplingParams(top_k=3))
    assert counts[3] == 0
    assert chi_square(counts[:3], probs[:3] / probs[:3].sum()) < CHI2_CRIT[2], counts.tolist()
    counts = empirical(probs.log().float(), SamplingParams(top_p=0.7))
    assert counts[2] == counts[3] == 0
    assert chi_square(counts[:2], probs[:2] / probs[:2].sum()) < CHI2_CRIT[1], counts.tolist()


def test_logprobs_of_the_chosen_token_are_those_of_the_raw_logits():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 40, generator=gen) * 2
    params = [
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=0.3, logprobs=3),  # temperature does not change the logprobs
        SamplingParams(temperature=1.0, top_k=2, logprobs=5),
        SamplingParams(temperature=0.8),  # no logprobs asked for
        SamplingParams(temperature=1.2, logprobs=1),
    ]
    result = sample(logits, params)
    reference = logits.double().log_softmax(dim=-1)
    assert result.logprobs is not None and len(result.logprobs) == 5
    for row, token in enumerate(result.token_ids):
        assert math.isclose(result.logprobs[row], reference[row, token].item(), abs_tol=1e-5)
    for row, p in enumerate(params):
        top = result.top_logprobs[row]
        assert len(top) == (p.logprobs or 0)
        values = [lp for _, lp in top]
        assert values == sorted(values, reverse=True)
        expected = reference[row].topk(len(top)).indices.tolist()
        assert [t for t, _ in top] == expected
        for t, lp in top:
            assert math.isclose(lp, reference[row, t].item(), abs_tol=1e-5)


def test_logprobs_zero_gives_no_alternatives():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    result = sample(logits, [SamplingParams(temperature=0, logprobs=0)])
    assert result.token_ids == [2]
    assert result.top_logprobs == [[]]
    assert math.isclose(result.logprobs[0], logits.log_softmax(-1)[0, 2].item(), abs_tol=1e-6)
