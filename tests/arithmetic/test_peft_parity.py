"""loraplex.arithmetic against PEFT's `add_weighted_adapter` (peft 0.21.x), on adapters PEFT made and saved.

- Parameter-space family (linear, ties, magnitude_prune, and dare_* at density 1): loraplex's merged A and B
  must equal PEFT's merged lora_A / lora_B tensor for tensor (inputs of equal rank, as PEFT requires), with
  scale 1 (PEFT's merged config has lora_alpha = r).
- cat and svd: the update B @ A * scale must equal PEFT's (factorisations are not unique).
- delta space (space="delta"): PEFT's ties_svd / magnitude_prune_svd updates.
- DARE below density 1 draws its own masks, so it is checked by what any DARE result must be: every entry is
  one of the values the kept/dropped patterns allow (kept entries c_t·x_t/d), the kept fraction is about d,
  the same seed gives the same result and another seed another.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from loraplex.arithmetic import MergeParams, add, cat, delta, merge, svd

from .peft_ref import PEFT_BANK, exact_sum, expected_rank, expected_scale, has_module, rel_err

# ---------------------------------------------------------------- the inputs as loaded


def test_loaded_inputs_are_peft_updates(lora, peft_bank):
    """Sanity of the fixtures: each input as loraplex loads it has PEFT's modules and PEFT's updates."""
    for name in PEFT_BANK:
        ours, theirs = lora[name].modules, peft_bank.deltas(name)
        assert set(ours) == set(theirs), name
        for key, module in ours.items():
            assert module.scale == pytest.approx(expected_scale(name, *key)), (name, key)
            torch.testing.assert_close(delta(module), theirs[key], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- parameter space, tensor for tensor

PARAMETER_CASES = [
    # (method, inputs, weights, extra MergeParams / PEFT arguments)
    ("linear", ["a8", "b8", "c8"], [0.7, -0.4, 1.3], {}),
    # rsLoRA first: PEFT's merged config inherits use_rslora (scaling sqrt(r), #3761); its tensors are still the
    # reference, and loraplex's scale must be 1
    ("linear", ["rs8", "a8", "e8"], [1.0, 0.5, -0.8], {}),
    ("linear", ["c8"], [-1.5], {}),
    # density 0.35: int(0.35 * numel) differs from round() for 8x256 (716.8) and 8x704 (1971.2)
    ("ties", ["a8", "b8", "c8"], [1.0, 0.6, -0.9], dict(density=0.35, majority_sign="total")),
    ("ties", ["a8", "b8", "c8"], [1.0, 0.6, -0.9], dict(density=0.5, majority_sign="frequency")),
    ("ties", ["b8", "rs8", "e8"], [-0.5, 1.2, 2.0], dict(density=0.2, majority_sign="total")),
    ("magnitude_prune", ["a8", "b8", "c8"], [0.8, 1.2, -0.5], dict(density=0.35)),
    ("dare_linear", ["a8", "b8", "c8"], [0.8, -1.2, 0.5], dict(density=1.0)),
    ("dare_ties", ["a8", "b8", "c8"], [0.8, -1.2, 0.5], dict(density=1.0, majority_sign="frequency")),
]


def _peft_kwargs(extra: dict) -> dict:
    out = {}
    if "density" in extra:
        out["density"] = extra["density"]
    if "majority_sign" in extra:
        out["majority_sign_method"] = extra["majority_sign"]
    return out


@pytest.mark.parametrize(("method", "names", "weights", "extra"), PARAMETER_CASES,
                         ids=[f"{c[0]}-{'+'.join(c[1])}-{c[3].get('majority_sign', '')}{c[3].get('density', '')}"
                              for c in PARAMETER_CASES])
def test_parameter_space_equals_peft_tensors(lora, peft_bank, method, names, weights, extra):
    peft_out = peft_bank.merge(names, weights, method, **_peft_kwargs(extra))
    ours = merge([lora[n] for n in names], weights, MergeParams(method, **extra), "m")
    assert set(ours.modules) == set(peft_out), "modules: the union of the inputs' targets, as PEFT's"
    for key, (a, b, _) in peft_out.items():
        module = ours.modules[key]
        assert module.scale == 1.0, key
        assert module.a.shape == a.shape and module.b.shape == b.shape, key
        torch.testing.assert_close(module.a, a, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k} lora_A: {m}")
        torch.testing.assert_close(module.b, b, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k} lora_B: {m}")


def test_ties_pruning_is_not_a_no_op(lora, peft_bank):
    """Guards the ties cases above from passing vacuously: at density 0.35 a single-input module's A
    (k_proj is c8's alone) keeps exactly int(0.35 * numel) entries, as PEFT's topk does."""
    peft_out = peft_bank.merge(["a8", "b8", "c8"], [1.0, 0.6, -0.9], "ties", density=0.35)
    ours = merge([lora[n] for n in ("a8", "b8", "c8")], [1.0, 0.6, -0.9], MergeParams("ties", density=0.35), "m")
    for key in [(0, "k_proj"), (3, "k_proj")]:
        a = ours.modules[key].a
        assert int((a != 0).sum()) == int(0.35 * a.numel()) == int((peft_out[key][0] != 0).sum())


# ---------------------------------------------------------------- cat: PEFT's update


def test_cat_equals_peft_cat_update(lora, peft_bank):
    """Mixed ranks (8, 4), rank/alpha patterns and rsLoRA: PEFT's cat update B @ A (its merged scaling is 1:
    the first input is not rsLoRA) equals loraplex's cat, add and merge('cat') updates."""
    names, weights = ["a8", "m4", "pat", "rs8"], [0.6, -1.1, 0.8, 0.5]
    peft_out = peft_bank.merge(names, weights, "cat")
    inputs = [lora[n] for n in names]
    results = [cat(inputs, weights, "c"), add(inputs, weights, "c"), merge(inputs, weights, MergeParams("cat"), "c")]
    for key, (a, b, scaling) in peft_out.items():
        assert scaling == 1.0
        expected = scaling * b.double() @ a.double()
        for ours in results:
            assert set(ours.modules) == set(peft_out)
            module = ours.modules[key]
            assert module.scale == 1.0
            assert module.rank == sum(expected_rank(n, key[1]) for n in names if has_module(n, key)), key
            assert rel_err(delta(module), expected) < 1e-5, key


# ---------------------------------------------------------------- svd: PEFT's update


@pytest.mark.parametrize("rank", [3, 8, None])
def test_svd_equals_peft_svd_alpha_equals_r(lora, peft_bank, rank):
    """Inputs with lora_alpha == r (s_i = 1), where every PEFT version's svd core is the exact sum."""
    names, weights = ["e8", "e4"], [0.9, -0.6]
    peft_out = peft_bank.merge(names, weights, "svd", svd_rank=rank)
    inputs = [lora[n] for n in names]
    results = [merge(inputs, weights, MergeParams("svd", rank=rank), "s")]
    if rank is not None:
        results.append(svd(inputs, weights, rank, "s"))
    for ours in results:
        assert set(ours.modules) == set(peft_out)
        for key, (a, b, scaling) in peft_out.items():
            module = ours.modules[key]
            assert module.rank <= (rank or 8)
            assert rel_err(delta(module), scaling * b.double() @ a.double()) < 1e-4, key


@pytest.mark.parametrize("rank", [4, 12])
def test_svd_equals_peft_svd_alpha_not_r(lora, peft_bank, peft_svd_weights, rank):
    """Scales 2, 0.5, 4 and 3, negative weights, partly disjoint targets; at rank 12 k_proj (c8's alone, rank
    8) is exact and q_proj (rank 28 in all) is truncated."""
    names, weights = ["a8", "b8", "c8", "m4"], [0.5, 1.5, -0.7, 0.9]
    peft_out = peft_bank.merge(names, peft_svd_weights(names, weights), "svd", svd_rank=rank)
    ours = svd([lora[n] for n in names], weights, rank, "s")
    assert set(ours.modules) == set(peft_out)
    for key, (a, b, scaling) in peft_out.items():
        module = ours.modules[key]
        assert module.scale == 1.0
        assert module.rank <= rank
        assert rel_err(delta(module), scaling * b.double() @ a.double()) < 1e-4, key


def test_peft_svd_reference_is_the_exact_sum(peft_bank, peft_svd_weights):
    """The reference itself, at full rank: PEFT's svd (given the weights above) reproduces Σ w_i s_i B_i A_i,
    computed here from PEFT's get_delta_weight. A failure here is in the test's view of PEFT, not loraplex."""
    names, weights = ["a8", "b8", "m4"], [1.0, -2.0, 0.5]
    peft_out = peft_bank.merge(names, peft_svd_weights(names, weights), "svd", svd_rank=20)
    expected = exact_sum([peft_bank.deltas(n) for n in names], weights)
    for key, (a, b, scaling) in peft_out.items():
        assert rel_err(scaling * b.double() @ a.double(), expected[key]) < 1e-5, key


# ---------------------------------------------------------------- delta space: PEFT's *_svd combinations

DELTA_CASES = [
    ("ties", "ties_svd", dict(density=0.35, majority_sign="total"), 8),
    ("ties", "ties_svd", dict(density=0.5, majority_sign="frequency"), 5),
    ("magnitude_prune", "magnitude_prune_svd", dict(density=0.5), 6),
]


@pytest.mark.parametrize(("method", "peft_type", "extra", "rank"), DELTA_CASES,
                         ids=[f"{c[0]}-{c[2].get('majority_sign', '')}{c[2]['density']}-r{c[3]}" for c in DELTA_CASES])
def test_delta_space_equals_peft_svd_family(lora, peft_bank, peft_svd_weights, method, peft_type, extra, rank):
    """docs/merging.md: in delta space PEFT's f runs on the dense updates with c_t = w_i and the result is
    refactored to `rank` by a dense SVD, which is PEFT's `<method>_svd` combination."""
    names, weights = ["a8", "b8", "c8"], [1.0, 0.6, -0.9]
    peft_out = peft_bank.merge(names, peft_svd_weights(names, weights), peft_type, svd_rank=rank,
                               **_peft_kwargs(extra))
    ours = merge([lora[n] for n in names], weights, MergeParams(method, space="delta", rank=rank, **extra), "d")
    assert set(ours.modules) == set(peft_out)
    for key, (a, b, scaling) in peft_out.items():
        module = ours.modules[key]
        assert module.rank <= rank
        assert rel_err(delta(module), scaling * b.double() @ a.double()) < 1e-3, key


# ---------------------------------------------------------------- DARE by its properties

DARE_NAMES, DARE_WEIGHTS, DENSITY = ["a8", "c8"], [0.8, -1.2], 0.4


def _coefficients(names, weights, key):
    """PEFT's per-input factors for A (sign(u)·sqrt|u|) and B (sqrt|u|), u = w·s."""
    us = [w * expected_scale(n, *key) for n, w in zip(names, weights, strict=True)]
    return [math.copysign(math.sqrt(abs(u)), u) for u in us], [math.sqrt(abs(u)) for u in us]


def _ties_of(ys: list[torch.Tensor], cs: list[float], majority: str) -> torch.Tensor:
    """PEFT merge_utils: sign elected on the unweighted tensors, disjoint mean of the weighted agreeing ones."""
    stack = torch.stack(ys)
    votes = stack.sum(0) if majority == "total" else stack.sign().sum(0)
    gamma = torch.where(votes >= 0, 1.0, -1.0)
    agree = (stack.sign() == gamma).double()
    weighted = torch.stack([c * y for c, y in zip(cs, ys, strict=True)])
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1.0)


def _dare_patterns(out, xs, cs, method, density):
    """Which keep/drop pattern explains each entry of `out`: [entries, inputs] bool masks, after checking that
    every entry equals the value its pattern gives (kept entries rescaled by 1/density) within tolerance."""
    combos = list(itertools.product([0, 1], repeat=len(xs)))
    candidates = []
    for combo in combos:
        ys = [x * m / density for x, m in zip(xs, combo, strict=True)]
        if method == "dare_linear":
            candidates.append(sum(c * y for c, y in zip(cs, ys, strict=True)))
        else:
            candidates.append(_ties_of(ys, cs, "total"))
    cand = torch.stack(candidates)  # [combos, ...]
    dist = (cand - out.double()).abs()
    best = dist.argmin(0)
    worst = float(dist.min(0).values.max())
    assert worst < 1e-5, f"{method}: an entry is none of the values a keep/drop pattern allows (off by {worst:.3g})"
    return torch.tensor(combos, dtype=torch.bool)[best.flatten()]


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_entries_are_kept_values_over_density(lora, peft_bank, method):
    ours = merge([lora[n] for n in DARE_NAMES], DARE_WEIGHTS, MergeParams(method, density=DENSITY, seed=7), "d")
    assert set(ours.modules) == {k for n in DARE_NAMES for k in peft_bank.deltas(n)}
    kept = {n: [] for n in DARE_NAMES}
    both = []
    for key, module in ours.modules.items():
        assert module.scale == 1.0
        layer = peft_bank.layers[key]
        present = [n for n in DARE_NAMES if n in layer.lora_A]
        ca, cb = _coefficients(present, [DARE_WEIGHTS[DARE_NAMES.index(n)] for n in present], key)
        for part, out, cs in (("A", module.a, ca), ("B", module.b, cb)):
            xs = [(layer.lora_A if part == "A" else layer.lora_B)[n].weight.detach().double() for n in present]
            masks = _dare_patterns(out, xs, cs, method, DENSITY)
            # under dare_ties an entry both inputs kept with opposite signs shows only the winner's value, the
            # same as the loser dropped: masks are counted where they are observable (dare_linear: everywhere)
            if method == "dare_linear" or len(present) == 1:
                for i, n in enumerate(present):
                    kept[n].append(masks[:, i])
            if method == "dare_linear" and len(present) == 2:
                both.append(masks.all(1))
    for n, masks in kept.items():
        fraction = float(torch.cat(masks).double().mean())
        assert abs(fraction - DENSITY) < 0.02, f"{n}: kept {fraction:.3f} of its entries, density {DENSITY}"
    if method == "dare_ties":
        return
    fraction = float(torch.cat(both).double().mean())
    assert abs(fraction - DENSITY**2) < 0.02, f"both inputs kept at {fraction:.3f}, independent masks give {DENSITY**2}"


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_seed_decides_the_masks(lora, method):
    inputs = [lora[n] for n in DARE_NAMES]

    def run(seed):
        return merge(inputs, DARE_WEIGHTS, MergeParams(method, density=DENSITY, seed=seed), "d").modules

    first, again, other = run(3), run(3), run(4)
    for key in first:
        assert torch.equal(first[key].a, again[key].a) and torch.equal(first[key].b, again[key].b), key
    assert any(not torch.equal(first[k].a, other[k].a) or not torch.equal(first[k].b, other[k].b) for k in first)
    differing = sum(not torch.equal(first[k].a, other[k].a) for k in first)
    assert differing == len(first), "another seed must redraw every module's masks"


@pytest.mark.parametrize(("method", "same_as"), [("dare_linear", "linear"), ("dare_ties", "ties")])
def test_dare_at_density_one_is_its_deterministic_twin(lora, method, same_as):
    inputs = [lora[n] for n in ("a8", "b8", "c8")]
    weights = [0.8, -1.2, 0.5]
    extra = {} if same_as == "linear" else dict(density=1.0)
    dare = merge(inputs, weights, MergeParams(method, density=1.0, seed=11), "d")
    twin = merge(inputs, weights, MergeParams(same_as, **extra), "t")
    for key, module in twin.modules.items():
        torch.testing.assert_close(dare.modules[key].a, module.a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(dare.modules[key].b, module.b, rtol=1e-6, atol=1e-7)
