"""Properties of loraplex.arithmetic that follow from the maths, checked against independent computations:
per-input updates from PEFT's get_delta_weight, dense SVDs by torch.linalg, and the MWA / CoPA rules
written out here from their specifications (docs/merging.md; CoPA as the official RobustMerge code,
research/merging.md §2)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from loraplex.adapters_store.formats import LoRAAdapter, LoRAModule
from loraplex.arithmetic import MergeParams, add, cat, delta, merge, mwa_weights, negate, scale, svd
from loraplex.errors import LoraplexError

from .peft_ref import exact_sum, expected_rank, has_module, rel_err


def _snapshot(adapters):
    return [{k: (m.a.clone(), m.b.clone(), m.scale) for k, m in x.modules.items()} for x in adapters]


def _unchanged(adapters, snapshot):
    for x, snap in zip(adapters, snapshot, strict=True):
        assert set(x.modules) == set(snap)
        for k, (a, b, s) in snap.items():
            assert torch.equal(x.modules[k].a, a) and torch.equal(x.modules[k].b, b) and x.modules[k].scale == s


def test_delta_is_scale_b_a():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=gen), torch.randn(4, 3, generator=gen)
    torch.testing.assert_close(delta(LoRAModule(a=a, b=b, scale=0.75)), 0.75 * b @ a)


# ---------------------------------------------------------------- scale / negate


@pytest.mark.parametrize("name", ["pat", "rspat"])
def test_scale_and_negate(lora, peft_deltas, name):
    x = lora[name]
    snap = _snapshot([x])
    expected = peft_deltas(name)
    scaled, negated = scale(x, -0.35), negate(x)
    twice = negate(negate(x), name="back")
    assert twice.name == "back"
    for result, factor in ((scaled, -0.35), (negated, -1.0), (twice, 1.0), (scale(x, 0.0), 0.0)):
        assert set(result.modules) == set(expected)
        for key, d in expected.items():
            torch.testing.assert_close(delta(result.modules[key]), factor * d, rtol=1e-5, atol=1e-7)
    for key in expected:  # negate twice is the identity
        torch.testing.assert_close(delta(twice.modules[key]), delta(x.modules[key]), rtol=1e-6, atol=0.0)
    _unchanged([x], snap)


# ---------------------------------------------------------------- cat: the exact weighted sum

CAT_CASES = {
    "mixed-ranks": (["a8", "m4"], [1.0, -0.5]),
    "rslora-patterns": (["rs8", "rspat", "pat"], [0.7, 1.3, -0.2]),
    "disjoint-targets": (["sparse", "c8", "rspat"], [2.0, 1.0, -1.0]),
    "everything": (["a8", "b8", "c8", "rs8", "e4", "m4", "pat", "rspat", "sparse"],
                   [0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -1.0, 1.1]),
}


@pytest.mark.parametrize("case", list(CAT_CASES))
def test_cat_is_the_exact_weighted_sum(lora, peft_deltas, case):
    names, weights = CAT_CASES[case]
    inputs = [lora[n] for n in names]
    snap = _snapshot(inputs)
    expected = exact_sum([peft_deltas(n) for n in names], weights)
    for result in (cat(inputs, weights, "c"), add(inputs, weights, "c")):
        assert result.name == "c"
        assert set(result.modules) == set(expected), "the union of the inputs' modules, no more"
        for key, d in expected.items():
            module = result.modules[key]
            assert module.scale == 1.0
            assert module.rank == sum(expected_rank(n, key[1]) for n in names if has_module(n, key)), key
            assert rel_err(delta(module), d) < 1e-5, key
    _unchanged(inputs, snap)


# ---------------------------------------------------------------- svd: Eckart-Young

SVD_NAMES, SVD_WEIGHTS = ["a8", "m4", "pat", "rspat"], [1.0, -0.7, 0.5, 1.2]


def test_svd_at_full_rank_equals_cat(lora):
    inputs = [lora[n] for n in SVD_NAMES]
    exact = cat(inputs, SVD_WEIGHTS, "c")
    full = svd(inputs, SVD_WEIGHTS, 64, "s")
    assert set(full.modules) == set(exact.modules)
    for key, module in exact.modules.items():
        assert full.modules[key].scale == 1.0
        assert full.modules[key].rank == module.rank, f"{key}: min(rank asked, sum of the ranks there)"
        assert rel_err(delta(full.modules[key]), delta(module)) < 1e-5, key


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_svd_reaches_the_eckart_young_optimum(lora, peft_deltas, rank):
    """Per module: rank <= k, and ||M - D_k||_F = sqrt(Σ_{j>k} σ_j²), ||M - D_k||_2 = σ_{k+1}, with M the exact
    weighted sum (from PEFT's updates, float64) and σ its singular values: no rank-k matrix does better."""
    inputs = [lora[n] for n in SVD_NAMES]
    expected = exact_sum([peft_deltas(n) for n in SVD_NAMES], SVD_WEIGHTS)
    results = [svd(inputs, SVD_WEIGHTS, rank, "s"), merge(inputs, SVD_WEIGHTS, MergeParams("svd", rank=rank), "s")]
    for result in results:
        assert set(result.modules) == set(expected)
        for key, m in expected.items():
            module = result.modules[key]
            assert module.rank <= rank and module.scale == 1.0, key
            sigma = torch.linalg.svdvals(m)
            err = m - delta(module).double()
            floor = 1e-6 * float(sigma[0])
            assert float(torch.linalg.matrix_norm(err)) == pytest.approx(float(sigma[rank:].norm()), rel=1e-4,
                                                                         abs=floor), key
            assert float(torch.linalg.matrix_norm(err, ord=2)) == pytest.approx(
                float(sigma[rank]) if rank < len(sigma) else 0.0, rel=1e-4, abs=floor), key


def test_svd_default_rank_is_the_largest_input_rank(lora):
    inputs = [lora[n] for n in ("a8", "m4")]  # ranks 8 and 4: q_proj and v_proj have rank 12 in all
    result = merge(inputs, [1.0, 1.0], MergeParams("svd"), "s")
    assert max(m.rank for m in result.modules.values()) == 8
    assert result.modules[(0, "q_proj")].rank == 8


# ---------------------------------------------------------------- the PEFT family on one input


@pytest.mark.parametrize("weight", [1.0, -0.7, 2.5])
@pytest.mark.parametrize(("method", "extra"), [
    ("ties", dict(density=1.0)),
    ("ties", dict(density=1.0, majority_sign="frequency")),
    ("linear", {}),
    ("magnitude_prune", dict(density=1.0)),
    ("dare_linear", dict(density=1.0)),
    ("dare_ties", dict(density=1.0)),
])
def test_one_input_at_density_one_is_the_weighted_input(lora, peft_deltas, method, extra, weight):
    """A = sign(u)·sqrt|u|·A_1, B = sqrt|u|·B_1 with u = w·s: the update is w·ΔW_1 (identity at w = 1)."""
    for name in ("pat", "rs8"):
        result = merge([lora[name]], [weight], MergeParams(method, **extra), "one")
        expected = peft_deltas(name)
        assert set(result.modules) == set(expected)
        for key, d in expected.items():
            assert result.modules[key].scale == 1.0
            assert rel_err(delta(result.modules[key]), weight * d) < 1e-5, (name, key)


# ---------------------------------------------------------------- MWA


def _checkpoints(lora, count=3, seed=5):
    """`count` checkpoints of one run: a8's modules, ranks and scale, weights moved a little apart."""
    base = lora["a8"]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        modules = {k: LoRAModule(a=m.a + 0.3 * m.a.std() * torch.randn(m.a.shape, generator=gen),
                                 b=m.b + 0.3 * m.b.std() * torch.randn(m.b.shape, generator=gen), scale=m.scale)
                   for k, m in base.modules.items()}
        out.append(LoRAAdapter(name=f"ckpt{i}", modules=modules, config=dict(base.config)))
    return out


def _assert_average(result, checkpoints, weights):
    """A = Σ w_i A_i and (scale·B) = Σ w_i s_i B_i (equal s_i: where the scale is kept does not matter)."""
    for key in checkpoints[0].modules:
        module = result.modules[key]
        pairs = list(zip(weights, [c.modules[key] for c in checkpoints], strict=True))
        a = sum(w * c.a.double() for w, c in pairs)
        sb = sum(w * c.scale * c.b.double() for w, c in pairs)
        torch.testing.assert_close(module.a.double(), a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.scale * module.b.double(), sb, rtol=1e-5, atol=1e-6)


def test_mwa_penalty_zero_is_the_uniform_mean(lora):
    ckpts = _checkpoints(lora)
    snap = _snapshot(ckpts)
    result = merge(ckpts, None, MergeParams("mwa", metric_values=(1.3, 0.9, 1.1), penalty=0.0), "mwa")
    _assert_average(result, ckpts, [1 / 3] * 3)
    _unchanged(ckpts, snap)


def test_mwa_large_penalty_approaches_the_best_checkpoint(lora):
    ckpts = _checkpoints(lora)
    by_loss = merge(ckpts, None, MergeParams("mwa", metric="loss", metric_values=(1.3, 0.9, 1.1), penalty=80.0), "m")
    _assert_average(by_loss, ckpts, [0.0, 1.0, 0.0])  # lowest loss: the second
    by_step = merge(ckpts, None, MergeParams("mwa", metric="step", metric_values=(300, 200, 100), penalty=80.0), "m")
    _assert_average(by_step, ckpts, [1.0, 0.0, 0.0])  # latest step: the first


def test_mwa_weights_follow_the_formula(lora):
    ckpts = _checkpoints(lora)
    losses, p = (2.0, 0.5, 1.0), 1.5
    m = [1 / x for x in losses]
    expected = [v**p / sum(u**p for u in m) for v in m]
    assert mwa_weights(list(losses), "loss", p) == pytest.approx(expected, rel=1e-9)
    steps = [100.0, 200.0, 400.0]
    assert mwa_weights(steps, "step", 2.0) == pytest.approx([1 / 21, 4 / 21, 16 / 21], rel=1e-9)
    assert mwa_weights(steps, "step", 0.0) == pytest.approx([1 / 3] * 3, rel=1e-12)
    result = merge(ckpts, None, MergeParams("mwa", metric_values=losses, penalty=p), "m")
    _assert_average(result, ckpts, expected)


def test_mwa_folds_differing_scales_into_b(lora):
    """docs/merging.md: A = Σ w_i A_i, B = Σ w_i (s_i / s_0) B_i at scale s_0, i.e. scale·B = Σ w_i s_i B_i."""
    ckpts = _checkpoints(lora)
    ckpts[1] = LoRAAdapter(name="ckpt1", config=dict(ckpts[1].config), modules={
        k: LoRAModule(a=m.a, b=m.b, scale=3.0 * m.scale) for k, m in ckpts[1].modules.items()})
    losses, p = (1.3, 0.9, 1.1), 2.0
    result = merge(ckpts, None, MergeParams("mwa", metric_values=losses, penalty=p), "m")
    m = [1 / x for x in losses]
    _assert_average(result, ckpts, [v**p / sum(u**p for u in m) for v in m])


def test_mwa_weights_do_not_overflow():
    """m^p overflows a float long before the weights stop making sense: the answer must still be finite."""
    tiny = [1e-30, 2e-30, 4e-30]  # m = 1e30...: m^50 is inf in float64
    w = mwa_weights(tiny, "loss", 50.0)
    assert all(math.isfinite(v) for v in w) and sum(w) == pytest.approx(1.0)
    assert w[0] == pytest.approx(1.0, abs=1e-12) and w[1] == pytest.approx(2.0**-50, rel=1e-3)
    huge = mwa_weights([1.0, 2.0, 3.0], "step", 1e4)
    assert all(math.isfinite(v) for v in huge) and huge == pytest.approx([0.0, 0.0, 1.0], abs=1e-12)


# ---------------------------------------------------------------- CoPA


def _adapter(name, modules):
    return LoRAAdapter(name=name, modules=modules, config={})


def _copa_inputs(count=3, rank=8, d_in=40, d_out=24, scale_=2.0, seed=21):
    gen = torch.Generator().manual_seed(seed)
    return [_adapter(f"t{t}", {(0, "q_proj"): LoRAModule(a=torch.randn(rank, d_in, generator=gen),
                                                           b=torch.randn(d_out, rank, generator=gen), scale=scale_),
                                 (1, "v_proj"): LoRAModule(a=torch.randn(rank, d_in, generator=gen),
                                                           b=torch.randn(d_out // 2, rank, generator=gen),
                                                           scale=scale_)})
            for t in range(count)]


def _prune(x: torch.Tensor, keep: float) -> torch.Tensor:
    """RobustMerge: kthvalue(|x|, int(N·(1 - keep))) is the threshold, |x| >= it is kept (ties kept)."""
    flat = x.abs().flatten()
    kth = flat.kthvalue(int(flat.numel() * (1 - keep))).values
    return x * (x.abs() >= kth)


def _copa_reference(inputs, key, keep=0.2, clamp=0.2, fuse=2.0, guard=False):
    """The official RobustMerge merge of one module (research/merging.md §2), in float64; `guard`: a row of Â
    pruned to zero gets s = 1 before the clamp (docs/merging.md), where the official code divides by zero."""
    a_hat, b_hat, scales = [], [], []
    for x in inputs:
        a, b = x.modules[key].a.double(), x.modules[key].b.double()
        ah, bh = _prune(a, keep), _prune(b, keep)
        kept = ah.abs().sum(1)
        s = a.abs().sum(1) / kept
        if guard:
            s = torch.where(kept == 0, torch.ones_like(s), s)
        floor = torch.sort(s).values[int(s.numel() * (1 - clamp))]
        scales.append(torch.clamp(s, min=floor))
        a_hat.append(ah)
        b_hat.append(bh)
    a_star = fuse * sum(a_hat)
    b_star = fuse * sum(s[None, :] * bh for s, bh in zip(scales, b_hat, strict=True)) / sum(scales)[None, :]
    return a_star, b_star


@pytest.mark.parametrize(("keep", "clamp", "fuse"), [(0.2, 0.2, 2.0), (0.35, 0.5, 1.5)])
def test_copa_matches_the_official_rule(keep, clamp, fuse):
    inputs = _copa_inputs()
    for x in inputs:  # the official rule is defined only when no row of A is pruned away
        for m in x.modules.values():
            assert bool((_prune(m.a, keep).abs().sum(1) > 0).all())
    params = MergeParams("copa", keep_ratio=keep, clamp_ratio=clamp, fuse_weight=fuse)
    result = merge(inputs, None, params, "copa")
    assert set(result.modules) == set(inputs[0].modules)
    for key in inputs[0].modules:
        a_star, b_star = _copa_reference(inputs, key, keep, clamp, fuse)
        module = result.modules[key]
        torch.testing.assert_close(module.a.double(), a_star, rtol=1e-5, atol=1e-6)
        # ΔW = s_0 · B* A*: the scale may sit in the factor or in `scale`
        torch.testing.assert_close(module.scale * module.b.double(), 2.0 * b_star, rtol=1e-5, atol=1e-6)


def test_copa_folds_differing_scales_into_b():
    """docs/merging.md: an input whose scale differs from the first's has s_t / s_0 folded into its B first
    (the official code assumes equal scales); the result's update is s_0 · B* A*."""
    inputs = _copa_inputs()
    inputs[2] = _adapter("t2", {k: LoRAModule(a=m.a, b=m.b, scale=0.5) for k, m in inputs[2].modules.items()})
    folded = [inputs[0], inputs[1], _adapter("t2", {k: LoRAModule(a=m.a, b=m.b * (0.5 / 2.0), scale=2.0)
                                                   for k, m in inputs[2].modules.items()})]
    result = merge(inputs, None, MergeParams("copa"), "copa")
    for key in inputs[0].modules:
        a_star, b_star = _copa_reference(folded, key)
        module = result.modules[key]
        torch.testing.assert_close(module.a.double(), a_star, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.scale * module.b.double(), 2.0 * b_star, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("row", ["tiny-equal", "zero"])
def test_copa_pruned_row_stays_finite(row):
    """A whole row of one input's A below the pruning threshold (all-equal tiny values, or exactly zero, as a
    dead rank): Σ|Â row| = 0, where the official code divides by zero. The result must stay finite, A* is
    unaffected (that row adds nothing), and it equals the rule with the documented guard (s = 1 there)."""
    inputs = _copa_inputs()
    key = (0, "q_proj")
    module = inputs[1].modules[key]
    a = module.a.clone()
    a[3] = 1e-6 if row == "tiny-equal" else 0.0
    inputs[1] = _adapter("t1", {**inputs[1].modules, key: LoRAModule(a=a, b=module.b, scale=module.scale)})
    assert bool((_prune(a, 0.2)[3] == 0).all()), "the row must be pruned away for this test to mean anything"
    result = merge(inputs, None, MergeParams("copa"), "copa")
    for k, m in result.modules.items():
        assert bool(torch.isfinite(m.a).all()) and bool(torch.isfinite(m.b).all()) and math.isfinite(m.scale), k
    a_star, b_star = _copa_reference(inputs, key, guard=True)
    got = result.modules[key]
    torch.testing.assert_close(got.a.double(), a_star, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.scale * got.b.double(), 2.0 * b_star, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(method="ties", density=0.0), "density"),
    (dict(method="ties", density=1.5), "density"),
    (dict(method="ties", density=-0.2), "density"),
    (dict(method="dare_linear", density=float("nan")), "density"),
    (dict(method="average"), "method"),
    (dict(method=""), "method"),
    (dict(method="svd", rank=0), "rank"),
    (dict(method="ties", density=0.5, majority_sign="mean"), "majority_sign"),
    (dict(method="linear", space="weights"), "space"),
    (dict(method="mwa", penalty=-1.0), "penalty"),
    (dict(method="mwa", metric="accuracy"), "metric"),
    (dict(method="copa", keep_ratio=0.0), "keep_ratio"),
    (dict(method="copa", clamp_ratio=1.5), "clamp_ratio"),
    (dict(method="copa", fuse_weight=float("inf")), "fuse_weight"),
    (dict(method="dare_ties", density=0.5, seed=-1), "seed"),
])
def test_bad_merge_params_name_the_field(kwargs, field):
    with pytest.raises(LoraplexError) as info:
        MergeParams(**kwargs)
    assert info.value.field == field, info.value


def test_merge_params_is_frozen_and_takes_the_edges():
    params = MergeParams("ties", density=1.0)  # 1 is allowed: nothing pruned
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.density = 0.5  # type: ignore[misc]
    MergeParams("dare_linear", density=1e-3)
    MergeParams("mwa", penalty=0.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_non_finite_weight_is_refused(lora, method, bad):
    with pytest.raises(LoraplexError) as info:
        merge([lora["a8"], lora["b8"]], [1.0, bad], MergeParams(method), "x")
    assert info.value.field in ("weight", "weights"), info.value


def test_weight_count_must_match(lora):
    with pytest.raises(LoraplexError) as info:
        merge([lora["a8"], lora["b8"]], [1.0], MergeParams("linear"), "x")
    assert info.value.field in ("weight", "weights"), info.value
