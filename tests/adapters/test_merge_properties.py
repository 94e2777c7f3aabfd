"""Properties of loraplex.arithmetic that follow from the maths, on random adapters: negation, exactness of
cat, the Eckart–Young optimum of svd, identities of TIES and MWA, CoPA's guard, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

from loraplex.adapters_store.formats import LoRAAdapter, LoRAModule
from loraplex.arithmetic import MergeParams, delta, merge, mwa_weights, negate, scale
from loraplex.errors import LoraplexError

OUT, IN = 24, 20


def adapter(name: str, seed: int, ranks: dict[tuple[int, str], int], scale_: float = 0.5,
            base: str = "tiny") -> LoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {key: LoRAModule(a=torch.randn(r, IN, generator=gen), b=torch.randn(OUT, r, generator=gen),
                               scale=scale_ * (1 + key[0])) for key, r in ranks.items()}
    return LoRAAdapter(name=name, modules=modules, config={"base_model_name_or_path": base})


Q0, Q1, V0 = (0, "q_proj"), (1, "q_proj"), (0, "v_proj")


def test_negate_twice_is_the_identity_and_scale_scales_the_update():
    x = adapter("x", 1, {Q0: 4, V0: 2})
    twice = negate(negate(x))
    for key, module in x.modules.items():
        torch.testing.assert_close(delta(twice.modules[key]), delta(module))
        torch.testing.assert_close(delta(negate(x).modules[key]), -delta(module))
        torch.testing.assert_close(delta(scale(x, 2.5).modules[key]), 2.5 * delta(module))


def test_cat_is_the_exact_weighted_sum_with_mixed_ranks_and_disjoint_targets():
    x, y = adapter("x", 1, {Q0: 4, Q1: 3}), adapter("y", 2, {Q0: 8, V0: 2}, scale_=2.0)
    got = merge([x, y], [0.7, -1.3], MergeParams("cat"), "c")
    assert set(got.modules) == {Q0, Q1, V0}
    torch.testing.assert_close(delta(got.modules[Q0]), 0.7 * delta(x.modules[Q0]) - 1.3 * delta(y.modules[Q0]))
    torch.testing.assert_close(delta(got.modules[Q1]), 0.7 * delta(x.modules[Q1]))
    torch.testing.assert_close(delta(got.modules[V0]), -1.3 * delta(y.modules[V0]))
    assert got.modules[Q0].rank == 12 and got.modules[Q0].scale == 1.0


@pytest.mark.parametrize("rank", [1, 3, 6, 12])
def test_svd_reaches_the_eckart_young_optimum(rank):
    x, y = adapter("x", 3, {Q0: 4}), adapter("y", 4, {Q0: 8})
    exact = 0.6 * delta(x.modules[Q0]) + 0.9 * delta(y.modules[Q0])
    got = delta(merge([x, y], [0.6, 0.9], MergeParams("svd", rank=rank), "s").modules[Q0])
    singular = torch.linalg.svdvals(exact.double())  # computed here, densely
    optimum = float(singular[rank:].square().sum().sqrt())
    fp32_noise = 1e-6 * float(exact.norm())
    assert float((got.double() - exact.double()).norm()) == pytest.approx(optimum, rel=1e-4, abs=fp32_noise)
    assert torch.linalg.matrix_rank(got).item() == min(rank, 12)


def test_ties_of_one_adapter_at_density_one_is_the_identity():
    x = adapter("x", 5, {Q0: 4, V0: 2})
    got = merge([x], [1.0], MergeParams("ties", density=1.0), "t")
    for key, module in x.modules.items():
        torch.testing.assert_close(delta(got.modules[key]), delta(module), rtol=1e-5, atol=1e-5)


def test_mwa_weights_follow_the_formula():
    losses = [2.0, 1.0, 0.5]
    assert mwa_weights(losses, "loss", 0.0) == pytest.approx([1 / 3] * 3)
    m = [1 / v for v in losses]
    assert mwa_weights(losses, "loss", 2.0) == pytest.approx([v**2 / sum(u**2 for u in m) for v in m])
    assert mwa_weights([10, 20, 30], "step", 1.0) == pytest.approx([10 / 60, 20 / 60, 30 / 60])
    assert mwa_weights(losses, "loss", 500.0) == pytest.approx([0.0, 0.0, 1.0])  # no overflow


def test_mwa_at_penalty_zero_is_the_uniform_mean_and_at_large_penalty_the_best_checkpoint():
    ckpts = [adapter(f"c{i}", 10 + i, {Q0: 4, V0: 4}) for i in range(3)]
    mean = merge(ckpts, None, MergeParams("mwa", penalty=0.0, metric_values=(3.0, 2.0, 1.0)), "m")
    best = merge(ckpts, None, MergeParams("mwa", penalty=60.0, metric_values=(3.0, 2.0, 1.0)), "b")
    for key in ckpts[0].modules:
        torch.testing.assert_close(mean.modules[key].a, sum(c.modules[key].a for c in ckpts) / 3)
        torch.testing.assert_close(mean.modules[key].b, sum(c.modules[key].b for c in ckpts) / 3)
        torch.testing.assert_close(best.modules[key].a, ckpts[2].modules[key].a, atol=1e-6, rtol=1e-6)


def test_copa_never_gives_nan_when_a_row_of_a_is_pruned_to_zero():
    x, y = adapter("x", 20, {Q0: 4}), adapter("y", 21, {Q0: 4})
    x.modules[Q0].a[1] = 1e-6  # every entry of row 1 below the kept magnitudes
    x.modules[Q0].a[2] = 0.0  # and row 2 zero from the start (0 / 0 in the paper's code)
    got = merge([x, y], None, MergeParams("copa"), "p")
    module = got.modules[Q0]
    assert torch.isfinite(module.a).all() and torch.isfinite(module.b).all()
    assert module.a.abs().sum() > 0 and module.b.abs().sum() > 0


def test_copa_follows_the_official_rule_on_one_input():
    """One input: A* = f·Â, and B*[:, j] = f·s_j·B̂[:, j] / s_j = f·B̂ (the row scales cancel)."""
    x = adapter("x", 22, {Q0: 8})
    got = merge([x], None, MergeParams("copa", keep_ratio=0.5, fuse_weight=2.0), "p").modules[Q0]
    a, b = x.modules[Q0].a, x.modules[Q0].b
    for kept, whole in ((got.a, a), (got.b, b)):
        nonzero = kept != 0
        assert abs(int(nonzero.sum()) - whole.numel() // 2) <= 1  # half kept
        torch.testing.assert_close(kept[nonzero], 2.0 * whole[nonzero])
        assert float(whole[nonzero].abs().min()) >= float(whole[~nonzero].abs().max())  # the largest kept


@pytest.mark.parametrize(("params", "weights", "field"), [
    (dict(method="nope"), None, "method"),
    (dict(method="ties", density=0.0), None, "density"),
    (dict(method="ties", density=1.5), None, "density"),
    (dict(method="svd", rank=0), None, "rank"),
    (dict(method="mwa", penalty=-1.0), None, "penalty"),
    (dict(method="copa", keep_ratio=0.0), None, "keep_ratio"),
    (dict(method="mwa", space="delta"), None, "space"),
    (dict(method="cat"), [math.nan], "weight"),
    (dict(method="cat"), [math.inf], "weight"),
    (dict(method="copa"), [0.5], "weight"),
    (dict(method="mwa"), None, "metric_values"),
])
def test_bad_parameters_are_refused_naming_the_field(params, weights, field):
    x = adapter("x", 30, {Q0: 2})
    with pytest.raises(LoraplexError) as info:
        merge([x], weights, MergeParams(**params), "bad")
    assert info.value.field == field


def test_inputs_for_another_base_model_are_refused_naming_the_adapter_and_module():
    x = adapter("x", 1, {Q0: 2})
    other = LoRAAdapter("wide", {Q0: LoRAModule(torch.zeros(2, IN + 1), torch.zeros(OUT, 2), 1.0)})
    with pytest.raises(LoraplexError, match="'wide'.*model.layers.0.self_attn.q_proj"):
        merge([x, other], None, MergeParams("cat"), "m")
    with pytest.raises(LoraplexError, match="elsewhere"):
        merge([x, adapter("y", 2, {Q0: 2}, base="elsewhere")], None, MergeParams("cat"), "m")


def sparse_adapter(name: str, seed: int, keys, density: float = 0.2) -> LoRAAdapter:
    from loraplex.adapters_store.sparse_format import from_dense

    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for key in keys:
        dense = torch.randn(OUT, IN, generator=gen) * (torch.rand(OUT, IN, generator=gen) < density)
        modules[key] = LoRAModule(a=torch.zeros(0, IN), b=torch.zeros(OUT, 0), scale=1.0, sparse=from_dense(dense))
    return LoRAAdapter(name=name, modules=modules, config={"base_model_name_or_path": "tiny"})


def full_update(module: LoRAModule) -> torch.Tensor:
    return delta(module) + (module.sparse.dense() if module.sparse is not None else 0)


def test_scale_negate_and_cat_take_sparse_parts_exactly():
    s1, s2 = sparse_adapter("s1", 1, [Q0, V0]), sparse_adapter("s2", 2, [Q0])
    lora = adapter("l", 3, {Q0: 4})
    got = merge([s1, lora, s2], [0.5, -2.0, 1.5], MergeParams("cat"), "c")
    expected = 0.5 * full_update(s1.modules[Q0]) - 2.0 * delta(lora.modules[Q0]) + 1.5 * full_update(s2.modules[Q0])
    torch.testing.assert_close(full_update(got.modules[Q0]), expected)
    assert got.modules[Q0].rank == 4 and got.modules[Q0].sparse is not None  # low-rank + sparse
    torch.testing.assert_close(full_update(got.modules[V0]), 0.5 * full_update(s1.modules[V0]))
    torch.testing.assert_close(full_update(negate(s1).modules[Q0]), -full_update(s1.modules[Q0]))
    torch.testing.assert_close(full_update(scale(s1, 3.0).modules[Q0]), 3.0 * full_update(s1.modules[Q0]))


@pytest.mark.parametrize("method", ["svd", "mwa", "copa"])
def test_methods_outside_the_exact_sum_and_peft_family_refuse_sparse_inputs(method):
    s1 = sparse_adapter("s1", 1, [Q0])
    with pytest.raises(LoraplexError, match="sparse") as info:
        merge([s1, s1], None, MergeParams(method, density=0.5, metric_values=(1.0, 2.0)), "m")
    assert info.value.field == "sources"
