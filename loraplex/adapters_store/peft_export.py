"""Write a LoRAAdapter as a PEFT LoRA directory that `peft` loads as it is: each module's scale folded
into lora_B, so every module's scaling is 1 (lora_alpha = r, and for a module of another rank a
rank_pattern entry with an equal alpha_pattern entry); no rslora. A low-rank + sparse adapter is written
as peft-rosa lays a RoSA adapter out (docs/adapters.md).

Given the base model's config, modules are named as that model names them: on a fused checkpoint (Phi-3) the
parts fuse back into qkv_proj / gate_up_proj (one lora_A when the parts share it, as a split PEFT adapter's do,
else the parts' lora_A stacked over a block-diagonal lora_B: the same update), and a multimodal model's text
layers sit under model.language_model."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loraplex.adapters_store.formats import (
    ATTENTION_MODULES,
    CONFIG_FILE,
    FUSED_MODULES,
    WEIGHTS_FILE,
    LoRAAdapter,
    module_shape,
)
from loraplex.models.model_config import ModelConfig


def module_path(layer: int, module: str, base: ModelConfig | None = None) -> str:
    layers = "model.language_model.layers" if base is not None and base.text_of_multimodal else "model.layers"
    part = "self_attn" if module in ATTENTION_MODULES or module == "qkv_proj" else "mlp"
    return f"{layers}.{layer}.{part}.{module}"


def peft_modules(adapter: LoRAAdapter, base: ModelConfig | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT module path -> (lora_A, lora_B with the module's scale folded in), in layer order."""
    modules = {module_path(layer, module, base): (m.a.detach(), m.b.detach() * m.scale)
               for (layer, module), m in sorted(adapter.modules.items())}
    if base is None or not base.fused_checkpoint:
        return modules
    for layer in sorted({layer for layer, _ in adapter.modules}):
        for fused, parts in FUSED_MODULES.items():
            present = [part for part in parts if (layer, part) in adapter.modules]
            if present:
                pairs = [modules.pop(module_path(layer, part, base), None) for part in parts]
                modules[module_path(layer, fused, base)] = _fuse(pairs, [module_shape(base, p)[0] for p in parts])
    return dict(sorted(modules.items(), key=lambda item: _order(item[0])))


def _fuse(pairs: list[tuple[torch.Tensor, torch.Tensor] | None], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts' (A, B) -> one (A, B) of the fused projection whose update stacks theirs (a missing part: zero
    rows)."""
    present = [pair for pair in pairs if pair is not None]
    first_a = present[0][0]
    if all(a.shape == first_a.shape and torch.equal(a, first_a) for a, _ in present):  # one lora_A for all
        rank = first_a.shape[0]
        b = [pair[1] if pair is not None else first_a.new_zeros(n, rank) for pair, n in zip(pairs, rows, strict=True)]
        return first_a, torch.cat(b)
    a = torch.cat([pair[0] for pair in present])
    b = a.new_zeros(sum(rows), a.shape[0])
    row = col = 0
    for pair, n in zip(pairs, rows, strict=True):
        if pair is not None:
            rank = pair[0].shape[0]
            b[row:row + n, col:col + rank] = pair[1]
            col += rank
        row += n
    return a, b


def _order(path: str) -> tuple[int, str]:
    layer = path.split(".layers.", 1)[1].split(".", 1)[0]
    return int(layer), path


def peft_config(adapter: LoRAAdapter, base_model: str | None, base: ModelConfig | None = None,
                modules: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
    """adapter_config.json for the adapter's `peft_modules` (given, or made here)."""
    modules = peft_modules(adapter, base) if modules is None else modules
    ranks = {path: a.shape[0] for path, (a, _) in modules.items()}
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
                    base_model: str | None = None, base: ModelConfig | None = None) -> Path:
    """adapter_config.json and adapter_model.safetensors in `directory` (made if missing), weights in `dtype`;
    modules named as `base` names them (see the module docstring; None: a Llama-style model)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    modules = peft_modules(adapter, base)
    for path, (a, b) in modules.items():
        # a copy each (clone): parts that share one lora_A must not share memory in the file
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.to("cpu", dtype).clone().contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.to("cpu", dtype).clone().contiguous()
    base_model = base_model or adapter.config.get("base_model_name_or_path")
    config = peft_config(adapter, base_model, base, modules)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
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
