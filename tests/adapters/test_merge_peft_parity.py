"""loraplex.arithmetic against PEFT's own `add_weighted_adapter` (peft 0.21) on the same PEFT-made adapters: the
parameter-space family (linear, ties, magnitude_prune, dare_* at density 1) gives PEFT's merged lora_A
and lora_B tensors; cat and svd give PEFT's update B·A·scaling (their factorisations differ); DARE at
density < 1 draws its own masks, so it is checked by what a DARE mask must give."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_hf_base, lora_layers

from loraplex.adapters_store.formats import load_peft_lora
from loraplex.adapters_store.peft_export import module_path
from loraplex.arithmetic import MergeParams, delta, merge

# two adapters of one rank (PEFT's linear family needs equal ranks), different alphas and targets
SAME_RANK = {
    "x": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "y": dict(r=8, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"]),
}
# alpha == r, different ranks and targets
UNIT_SCALE = {
    "u": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "v": dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj"]),
}
WEIGHTS = [0.7, -0.4]


@pytest.fixture(scope="module")
def made(make_peft_adapter, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-parity")
    return {name: make_peft_adapter(root / name, kwargs, seed=300 + i, rel=0.2)
            for i, (name, kwargs) in enumerate({**SAME_RANK, **UNIT_SCALE}.items())}


def peft_merged(demo_dir: Path, paths: list[Path], weights: list[float], combination_type: str, **kwargs):
    """{module path: (lora_A, lora_B, scaling)} of the adapter PEFT's add_weighted_adapter makes."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_hf_base(demo_dir), paths[0], adapter_name="i0")
    for i, path in enumerate(paths[1:], 1):
        model.load_adapter(path, adapter_name=f"i{i}")
    model.add_weighted_adapter([f"i{i}" for i in range(len(paths))], weights, "merged",
                               combination_type=combination_type, **kwargs)
    return {name: (layer.lora_A["merged"].weight.detach(), layer.lora_B["merged"].weight.detach(),
                   layer.scaling["merged"])
            for name, layer in lora_layers(model).items() if "merged" in layer.lora_A}


def ours(paths: list[Path], weights, params: MergeParams):
    adapters = [load_peft_lora(p, p.name, None, 1 << 16) for p in paths]
    merged = merge(adapters, weights, params, "merged")
    return {module_path(*key): module for key, module in merged.modules.items()}


@pytest.mark.parametrize(("method", "kwargs"), [
    ("linear", {}),
    ("ties", {"density": 0.5, "majority_sign_method": "total"}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.4}),
    ("dare_linear", {"density": 1.0}),
    ("dare_ties", {"density": 1.0, "majority_sign_method": "total"}),
])
def test_parameter_space_merges_equal_peft_tensor_for_tensor(demo_dir, made, method, kwargs):
    paths = [made["x"], made["y"]]
    reference = peft_merged(demo_dir, paths, WEIGHTS, method, **kwargs)
    params = MergeParams(method, density=kwargs.get("density"), majority_sign=kwargs.get("majority_sign_method",
                                                                                        "total"))
    got = ours(paths, WEIGHTS, params)
    assert set(got) == set(reference)  # targets unioned: q, v, o, down
    for name, (a, b, scaling) in reference.items():
        assert scaling == 1.0 and got[name].scale == 1.0
        torch.testing.assert_close(got[name].a, a, atol=1e-6, rtol=1e-5, msg=f"{name} lora_A")
        torch.testing.assert_close(got[name].b, b, atol=1e-6, rtol=1e-5, msg=f"{name} lora_B")


def test_cat_equals_pefts_cat_update(demo_dir, made):
    paths = [made["x"], made["y"]]
    reference = peft_merged(demo_dir, paths, WEIGHTS, "cat")
    got = ours(paths, WEIGHTS, MergeParams("cat"))
    for name, (a, b, scaling) in reference.items():
        torch.testing.assert_close(delta(got[name]), scaling * b @ a, atol=1e-6, rtol=1e-5, msg=name)
        assert got[name].rank <= a.shape[0]  # PEFT zero-pads each module to the sum of the adapters' ranks


@pytest.mark.parametrize("rank", [2, 4, 12])
def test_svd_equals_pefts_svd_update_where_alpha_is_r(demo_dir, made, rank):
    paths = [made["u"], made["v"]]
    reference = peft_merged(demo_dir, paths, WEIGHTS, "svd", svd_rank=rank)
    got = ours(paths, WEIGHTS, MergeParams("svd", rank=rank))
    for name, (a, b, scaling) in reference.items():
        expected = scaling * b @ a
        torch.testing.assert_close(delta(got[name]), expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4,
                                   msg=name)


@pytest.mark.parametrize("rank", [3, 16])
def test_svd_equals_pefts_svd_update_with_other_scales_and_full_rank_equals_cat(demo_dir, made, rank):
    """alpha != r (scales 2 and 0.5): PEFT 0.21's svd weighs get_delta_weight (which holds the scale) by
    w_i alone, the exact sum, as loraplex does; at full rank (16 = 8 + 8) both equal cat."""
    paths = [made["x"], made["y"]]
    reference = peft_merged(demo_dir, paths, WEIGHTS, "svd", svd_rank=rank)
    got = ours(paths, WEIGHTS, MergeParams("svd", rank=rank))
    exact = ours(paths, WEIGHTS, MergeParams("cat"))
    for name, (a, b, scaling) in reference.items():
        expected = scaling * b @ a
        tolerance = 1e-5 * float(expected.abs().max())
        torch.testing.assert_close(delta(got[name]), expected, atol=tolerance, rtol=1e-4, msg=name)
        if rank == 16:
            torch.testing.assert_close(delta(exact[name]), expected, atol=tolerance, rtol=1e-4, msg=name)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_keeps_about_density_of_each_tensor_rescaled_and_is_seeded(made, method):
    paths = [made["x"]]
    adapter = load_peft_lora(paths[0], "x", None, 64)
    density = 0.3
    got = ours(paths, [1.0], MergeParams(method, density=density, seed=7))
    again = ours(paths, [1.0], MergeParams(method, density=density, seed=7))
    other = ours(paths, [1.0], MergeParams(method, density=density, seed=8))
    kept, total = 0, 0
    for key, module in adapter.modules.items():
        name = module_path(*key)
        u = module.scale
        a = module.a * u ** 0.5 / density  # a kept entry: the weighted value over the density
        dropped = got[name].a == 0
        torch.testing.assert_close(got[name].a[~dropped], a[~dropped])
        kept += int((~dropped).sum())
        total += dropped.numel()
        assert torch.equal(got[name].a, again[name].a)
    assert abs(kept / total - density) < 0.02
    assert any(not torch.equal(got[n].a, other[n].a) for n in got)
