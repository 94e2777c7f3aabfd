"""The reference side of the adapter-arithmetic tests: LoRA adapters made and saved by PEFT itself on the demo base
model, loaded the way loraplex loads them (`load_peft_lora`), and a PEFT reference that merges them with
`add_weighted_adapter` and reports PEFT's own per-module tensors and updates.

Everything expected here comes from PEFT (peft 0.21.x) or from the maths, never from loraplex's code:
per-input updates are PEFT's `get_delta_weight`, and scales are recomputed from the LoraConfig below.

Shapes (demo model): hidden 256, q_proj 256x256, k/v_proj 128x256, o_proj 256x256, gate/up 704x256,
down 256x704, 4 layers. Adapters target a few projections only, to keep the suite fast on 2 cores.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

Key = tuple[int, str]  # (layer, projection), as LoRAAdapter.modules keys it

# name -> (LoraConfig keyword arguments, seed). Ranks are all 8 among the ones PEFT's linear family merges
# (PEFT refuses unequal ranks there); alphas differ so that every scale s_i = alpha / r differs from 1.
ADAPTERS: dict[str, tuple[dict[str, Any], int]] = {
    "a8": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]), 11),  # s = 2
    "b8": (dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]), 12),  # s = 0.5
    # overlaps a8/b8 on q_proj only: k_proj is its own, v_proj / down_proj are not its
    "c8": (dict(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj"]), 13),  # s = 4
    "rs8": (dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"]), 14),  # 16/sqrt 8
    "e8": (dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 15),  # alpha == r
    "e4": (dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "gate_proj"]), 16),  # alpha == r
    "m4": (dict(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "gate_proj"]), 17),  # s = 3
    # rank_pattern / alpha_pattern: v_proj rank 2 (scale 16/2), q_proj alpha 4 (scale 4/8), o_proj 16/8
    "pat": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                 rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4}), 18),
    # rsLoRA with patterns: up_proj rank 3 (8/sqrt 3), k_proj alpha 20 (20/sqrt 6)
    "rspat": (dict(r=6, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "up_proj"],
                   rank_pattern={"up_proj": 3}, alpha_pattern={"k_proj": 20}), 19),
    # one layer only (layers_to_transform): most of its modules are absent
    "sparse": (dict(r=2, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]), 20),
}
# Adapters PEFT's add_weighted_adapter can take without tripping on its own quirks: "sparse" cannot be
# merged (PEFT injects the merged adapter by the union of target_modules, into layers where no input has
# that module, and then raises "No matching LoRAs found"); "rspat" is left out only to keep the bank small.
PEFT_BANK = ("a8", "b8", "c8", "rs8", "e8", "e4", "m4", "pat")


def expected_scale(name: str, layer: int, module: str) -> float:
    """PEFT's scaling of one module, recomputed from the LoraConfig above (patterns matched by suffix,
    which is what these plain keys mean to PEFT)."""
    kwargs, _ = ADAPTERS[name]
    rank = kwargs.get("rank_pattern", {}).get(module, kwargs["r"])
    alpha = kwargs.get("alpha_pattern", {}).get(module, kwargs["lora_alpha"])
    return alpha / math.sqrt(rank) if kwargs.get("use_rslora") else alpha / rank


def key_of(module_name: str) -> Key:
    """model.layers.3.self_attn.q_proj -> (3, "q_proj")."""
    parts = module_name.split(".")
    i = parts.index("layers")
    return int(parts[i + 1]), parts[-1]


def load_hf_base(model_dir: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def lora_layers(peft_model) -> dict[Key, Any]:
    from peft.tuners.lora import LoraLayer

    return {key_of(name): module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer) and ".layers." in name}


def build_peft_adapter(out_dir: Path, base_dir: Path, lora_kwargs: dict[str, Any], seed: int) -> Path:
    """`get_peft_model` + random A and B (PEFT initialises B to zero) + `save_pretrained`, as a user would."""
    import peft

    model = peft.get_peft_model(load_hf_base(base_dir),
                                peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sorted(lora_layers(model).items()):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=gen) / math.sqrt(a.shape[1]))
            b.copy_(torch.randn(b.shape, generator=gen) * 0.3 / math.sqrt(b.shape[1]))
    model.save_pretrained(out_dir)
    return Path(out_dir)


class PeftBank:
    """One PeftModel holding every adapter of PEFT_BANK; `merge` runs PEFT's add_weighted_adapter under a
    fresh name and returns {key: (lora_A, lora_B, scaling)} of the merged adapter, for every module PEFT
    gave it."""

    def __init__(self, base_dir: Path, dirs: dict[str, Path]) -> None:
        from peft import PeftModel

        names = list(PEFT_BANK)
        model = PeftModel.from_pretrained(load_hf_base(base_dir), dirs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(dirs[name], adapter_name=name)
        self.model = model.eval()
        self.layers = lora_layers(model)
        self._count = 0
        self._deltas: dict[str, dict[Key, torch.Tensor]] = {}

    @torch.no_grad()
    def merge(self, adapters: list[str], weights: list[float], combination_type: str,
              **kwargs) -> dict[Key, tuple[torch.Tensor, torch.Tensor, float]]:
        self._count += 1
        name = f"merged{self._count}"
        self.model.add_weighted_adapter(list(adapters), list(weights), name, combination_type=combination_type,
                                        **kwargs)
        out = {}
        for key, layer in self.layers.items():
            if name in layer.lora_A:
                out[key] = (layer.lora_A[name].weight.detach().clone(),
                            layer.lora_B[name].weight.detach().clone(), float(layer.scaling[name]))
        self.model.delete_adapter(name)
        return out

    @torch.no_grad()
    def deltas(self, adapter: str) -> dict[Key, torch.Tensor]:
        """PEFT's own update (get_delta_weight: scaling * B @ A) of every module of one input."""
        if adapter not in self._deltas:
            self._deltas[adapter] = {key: layer.get_delta_weight(adapter).detach().clone()
                                     for key, layer in self.layers.items() if adapter in layer.lora_A}
        return self._deltas[adapter]


def exact_sum(parts: list[dict[Key, torch.Tensor]], weights: list[float]) -> dict[Key, torch.Tensor]:
    """Σ_i w_i ΔW_i per module, over the inputs that have the module, in float64."""
    out: dict[Key, torch.Tensor] = {}
    for part, w in zip(parts, weights, strict=True):
        for key, d in part.items():
            out[key] = out.get(key, torch.zeros(d.shape, dtype=torch.float64)) + w * d.double()
    return out


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


def expected_rank(name: str, module: str) -> int:
    kwargs, _ = ADAPTERS[name]
    return kwargs.get("rank_pattern", {}).get(module, kwargs["r"])


def has_module(name: str, key: Key) -> bool:
    kwargs, _ = ADAPTERS[name]
    layers = kwargs.get("layers_to_transform")
    return key[1] in kwargs["target_modules"] and (layers is None or key[0] in layers)
