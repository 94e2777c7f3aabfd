"""Write a LoRAAdapter as a PEFT LoRA directory that `peft` loads as it is: each module's scale folded
into lora_B, so every module's scaling is 1 (lora_alpha = r, and for a module of another rank a
rank_pattern entry with an equal alpha_pattern entry); no rslora. A low-rank + sparse adapter is written
as peft-rosa lays a RoSA adapter out (docs/adapters.md)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loraplex.adapters_store.formats import ATTENTION_MODULES, CONFIG_FILE, WEIGHTS_FILE, LoRAAdapter


def module_path(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{'self_attn' if module in ATTENTION_MODULES else 'mlp'}.{module}"


def peft_config(adapter: LoRAAdapter, base_model: str | None) -> dict:
    ranks = {module_path(*key): m.rank for key, m in sorted(adapter.modules.items())}
    r = max(ranks.values())
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": r, "use_rslora": False, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        # the exact modules: a merge of adapters with different targets adapts some layers only
        "target_modules": list(ranks), "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0,
        "inference_mode": True, "init_lora_weights": True, "use_dora": False,
    }


def write_peft_lora(adapter: LoRAAdapter, directory: Path, dtype: torch.dtype = torch.float32,
                    base_model: str | None = None) -> Path:
    """adapter_config.json and adapter_model.safetensors in `directory` (made if missing), weights in `dtype`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, module), m in sorted(adapter.modules.items()):
        prefix = f"base_model.model.{module_path(layer, module)}"
        tensors[f"{prefix}.lora_A.weight"] = m.a.detach().to("cpu", dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = (m.b.detach() * m.scale).to("cpu", dtype).contiguous()
    base_model = base_model or adapter.config.get("base_model_name_or_path")
    (directory / CONFIG_FILE).write_text(json.dumps(peft_config(adapter, base_model), indent=2) + "\n")
    save_file(tensors, str(directory / WEIGHTS_FILE))
    return directory


def write_rosa(adapter: LoRAAdapter, directory: Path, dtype: torch.dtype = torch.float32,
               base_model: str | None = None) -> Path:
    """A low-rank + sparse adapter as peft-rosa saves one: rosa_A / rosa_B as lora_A / lora_B above, and
    rosa_spa (values, row_offs, col_idx, row_idx: the rows by descending length) for modules with a sparse
    part. A module with a sparse part only gets zero rank-1 factors (peft-rosa gives every module both)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules = {}
    for key, m in adapter.modules.items():
        if m.rank == 0:
            m = dataclasses.replace(m, a=torch.zeros(1, m.a.shape[1]), b=torch.zeros(m.b.shape[0], 1), scale=1.0)
        modules[key] = m
    tensors = {}
    for (layer, module), m in sorted(modules.items()):
        prefix = f"base_model.model.{module_path(layer, module)}"
        tensors[f"{prefix}.rosa_A.weight"] = m.a.detach().to("cpu", dtype).contiguous()
        tensors[f"{prefix}.rosa_B.weight"] = (m.b.detach() * m.scale).to("cpu", dtype).contiguous()
        if m.sparse is not None:
            out_features, in_features = m.sparse.shape
            lengths = m.sparse.crow[1:] - m.sparse.crow[:-1]
            tensors[f"{prefix}.rosa_spa.values"] = m.sparse.values.to("cpu", dtype).contiguous()
            tensors[f"{prefix}.rosa_spa.row_offs"] = m.sparse.crow.to("cpu", torch.int32).contiguous()
            tensors[f"{prefix}.rosa_spa.col_idx"] = m.sparse.col.to("cpu", _index_dtype(in_features)).contiguous()
            tensors[f"{prefix}.rosa_spa.row_idx"] = torch.argsort(lengths.cpu(), descending=True, stable=True).to(
                _index_dtype(out_features)).contiguous()
    rosa = dataclasses.replace(adapter, modules=modules)
    config = peft_config(rosa, base_model or adapter.config.get("base_model_name_or_path"))
    sizes = sum(m.sparse.shape[0] * m.sparse.shape[1] for m in modules.values() if m.sparse is not None)
    config.update(peft_type="ROSA", d=rosa.nnz / sizes if sizes else 0.0, rosa_dtype=str(dtype).removeprefix("torch."),
                  spa_store_transpose=False)
    del config["use_dora"]
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(directory / WEIGHTS_FILE))
    return directory


def _index_dtype(size: int) -> torch.dtype:
    """int16 as peft-rosa stores indices, where they fit."""
    return torch.int16 if size <= 2**15 - 1 else torch.int32


def weights_dtype(directory: Path) -> torch.dtype:
    """The dtype of an adapter's weights (of its lora_A / lora_B tensors; float32 when they differ)."""
    with safe_open(str(Path(directory) / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()  # noqa: SIM118
                  if key.endswith((".weight", "magnitude_vector", ".values"))}  # values, not indices
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float32}
    found = {names.get(d, torch.float32) for d in dtypes}
    return found.pop() if len(found) == 1 else torch.float32
