"""Session fixtures for the adapter-arithmetic tests (helpers and the PEFT reference: peft_ref.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .peft_ref import ADAPTERS, Key, PeftBank, build_peft_adapter, load_hf_base, lora_layers


@pytest.fixture(scope="session")
def adapter_dirs(demo_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arith-adapters")
    return {name: build_peft_adapter(root / name, Path(demo_dir), kwargs, seed)
            for name, (kwargs, seed) in ADAPTERS.items()}


@pytest.fixture(scope="session")
def base_config(demo_dir):
    from loraplex.models.model_config import ModelConfig

    return ModelConfig.from_file(Path(demo_dir) / "config.json")


@pytest.fixture(scope="session")
def lora(adapter_dirs, base_config) -> dict:
    """name -> LoRAAdapter, read by loraplex's own loader from the PEFT-saved directory."""
    from loraplex.adapters_store.formats import load_peft_lora

    return {name: load_peft_lora(path, name, base_config, 64) for name, path in adapter_dirs.items()}


@pytest.fixture(scope="session")
def peft_bank(demo_dir, adapter_dirs) -> PeftBank:
    return PeftBank(Path(demo_dir), adapter_dirs)


@pytest.fixture(scope="session")
def peft_deltas(demo_dir, adapter_dirs):
    """`peft_deltas(name)` -> {key: PEFT's get_delta_weight} for any adapter of ADAPTERS, each read by
    `PeftModel.from_pretrained` alone (so adapters PEFT cannot merge are covered too)."""
    from peft import PeftModel

    cache: dict[str, dict[Key, torch.Tensor]] = {}

    @torch.no_grad()
    def get(name: str) -> dict[Key, torch.Tensor]:
        if name not in cache:
            model = PeftModel.from_pretrained(load_hf_base(Path(demo_dir)), adapter_dirs[name])
            cache[name] = {key: layer.get_delta_weight("default").detach().clone()
                           for key, layer in lora_layers(model).items() if "default" in layer.lora_A}
        return cache[name]

    return get


@pytest.fixture(scope="session")
def peft_svd_weights(peft_bank):
    """`peft_svd_weights(names, weights)`: the weights to hand PEFT's svd family so that its dense core is the
    exact Σ w_i ΔW_i.

    peft 0.21 weighs `get_delta_weight` (which holds s_i) by w_i: the exact sum. The PEFT snapshot studied in
    research/merging.md §4 (5d602fdb) weighed it by w_i·s_i, a core of Σ w_i s_i² B_i A_i. Which one the
    installed PEFT does is measured once here (at full rank, where the SVD is exact), so the svd parity tests
    hold on either; an adapter's scale must then be the same on all its modules."""
    from .peft_ref import exact_sum, expected_scale, rel_err

    names, weights = ["a8", "c8"], [1.0, 1.0]  # scales 2 and 4
    merged = peft_bank.merge(names, weights, "svd", svd_rank=16)
    key = (0, "q_proj")
    a, b, scaling = merged[key]
    got = scaling * b @ a
    parts = [peft_bank.deltas(n) for n in names]
    err_exact = rel_err(got, exact_sum(parts, weights)[key])
    quirk_weights = [w * expected_scale(n, 0, "q_proj") for n, w in zip(names, weights, strict=True)]
    err_quirk = rel_err(got, exact_sum(parts, quirk_weights)[key])
    assert min(err_exact, err_quirk) < 1e-5, (err_exact, err_quirk)
    exact = err_exact < err_quirk

    def to_peft(names: list[str], weights: list[float]) -> list[float]:
        if exact:
            return list(weights)
        scales = [{expected_scale(n, 0, m) for m in ADAPTERS[n][0]["target_modules"]} for n in names]
        assert all(len(s) == 1 for s in scales), "the 1/s_i adjustment needs one scale per adapter"
        return [w / s.pop() for w, s in zip(weights, scales, strict=True)]

    return to_peft
