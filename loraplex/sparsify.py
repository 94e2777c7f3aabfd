"""`loraplex adapters sparsify`: a fully fine-tuned checkpoint of a base model -> a sparse delta of the base
(docs/adapters.md), the largest |fine-tuned - base| entries of every projection kept. Module by module:
only one projection of each checkpoint is in memory at a time (the global threshold keeps, besides,
the k largest magnitudes seen so far), so a pair of 8B checkpoints fits in host memory."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from loraplex.adapters_store.formats import FUSED_MODULES, LORA_MODULES, module_shape
from loraplex.adapters_store.sparse_format import SparseDelta, from_dense, write_sparse_delta
from loraplex.errors import invalid
from loraplex.models.loader import find_weight_files
from loraplex.models.model_config import ModelConfig

_PARTS = {m: "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for m in LORA_MODULES}


class _Tensors:
    """Every tensor of a checkpoint directory by name, read one at a time from its (memory-mapped) file. A fused
    projection (Phi-3's qkv_proj, gate_up_proj) is also found under its parts' names, as their rows."""

    def __init__(self, directory: Path, stack: ExitStack) -> None:
        self.files = {}
        for file in find_weight_files(directory):
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for name in handle.keys():  # noqa: SIM118
                self.files[name] = handle
        self.parts: dict[str, tuple[str, int, int]] = {}  # part's name -> (fused name, first row, end row)
        fused = [name for name in self.files if name.rpartition(".weight")[0].rpartition(".")[2] in FUSED_MODULES]
        if fused:
            config = ModelConfig.from_file(directory / "config.json")
            for name in fused:
                prefix, _, leaf = name.removesuffix(".weight").rpartition(".")
                start = 0
                for part in FUSED_MODULES[leaf]:
                    rows = module_shape(config, part)[0]
                    self.parts[f"{prefix}.{part}.weight"] = (name, start, start + rows)
                    start += rows

    def __contains__(self, name: str) -> bool:
        return name in self.files or name in self.parts

    def get(self, name: str) -> torch.Tensor:
        if name in self.parts:
            fused, start, end = self.parts[name]
            return self.files[fused].get_slice(fused)[start:end]
        return self.files[name].get_tensor(name)


def projection_names(tensors: _Tensors) -> list[str]:
    """The projections' weight names (model.layers.N.<part>.<proj>) the checkpoint has, in layer order."""
    names = []
    layer = 0
    while f"model.layers.{layer}.self_attn.q_proj.weight" in tensors:
        names += [f"model.layers.{layer}.{_PARTS[m]}.{m}" for m in LORA_MODULES
                  if f"model.layers.{layer}.{_PARTS[m]}.{m}.weight" in tensors]
        layer += 1
    return names


def sparsify(base: Path, finetuned: Path, density: float, output: Path, global_threshold: bool = False,
             dtype: torch.dtype | None = None, progress: bool = True) -> dict:
    """Write the sparse delta of `finetuned` against `base` to `output`; returns its adapter_config."""
    if not 0 < density <= 1:
        raise invalid("density", f"must be in (0, 1], got {density}")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise invalid("output", f"{output} exists and is not an empty directory; name a new one")
    with ExitStack() as stack:
        before, after = _Tensors(base, stack), _Tensors(finetuned, stack)
        names = projection_names(before)
        if not names:
            raise invalid("base", f"{base}: no model.layers.N.self_attn.q_proj.weight: not a Llama-family checkpoint")
        missing = [n for n in names if f"{n}.weight" not in after]
        if missing:
            raise invalid("finetuned", f"{finetuned} lacks {missing[0]}.weight: not a fine-tune of {base}")
        threshold = _global_threshold(before, after, names, density, progress) if global_threshold else None
        deltas: dict[str, SparseDelta] = {}
        value_dtype = dtype or after.get(f"{names[0]}.weight").dtype
        for name, delta in _deltas(before, after, names, "sparsifying", progress):
            magnitude = delta.abs()
            if threshold is None:
                k = max(int(density * delta.numel()), 1)
                cut = magnitude.flatten().kthvalue(delta.numel() - k + 1).values if k < delta.numel() else None
            else:
                cut = threshold
            kept = delta if cut is None else torch.where(magnitude >= cut, delta, 0.0)
            deltas[name] = from_dense(kept)
        others = _other_changes(before, after, names)
        if others:
            print(f"warning: {len(others)} other tensor(s) differ between the checkpoints (e.g. {others[0]}); a "
                  "sparse delta holds only the q/k/v/o/gate/up/down projections", file=sys.stderr)
    write_sparse_delta(deltas, output, str(base), dtype=_values_dtype(value_dtype))
    return json.loads((output / "adapter_config.json").read_text())


def _values_dtype(dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def _deltas(before: _Tensors, after: _Tensors, names: list[str], what: str,
            progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    for name in tqdm(names, desc=what, unit="module", disable=not progress, file=sys.stderr):
        old, new = before.get(f"{name}.weight"), after.get(f"{name}.weight")
        if old.shape != new.shape:
            raise invalid("finetuned", f"{name}: {tuple(new.shape)} in the fine-tuned checkpoint, "
                          f"{tuple(old.shape)} in the base: not a fine-tune of this base")
        yield name, new.float() - old.float()


def _global_threshold(before: _Tensors, after: _Tensors, names: list[str], density: float,
                      progress: bool) -> float:
    """The magnitude of the k-th largest |Δ| over all projections (k = density · all entries), as diff
    pruning's single threshold; the running top k is the only thing held besides one module."""
    total = sum(before.get(f"{n}.weight").numel() for n in names)
    k = max(int(density * total), 1)
    best = torch.empty(0)
    for _, delta in _deltas(before, after, names, "threshold", progress):
        candidates = torch.cat([best, delta.abs().flatten()])
        best = candidates.topk(min(k, candidates.numel())).values
    return float(best[-1])


def _other_changes(before: _Tensors, after: _Tensors, names: list[str]) -> list[str]:
    projections = {f"{n}.weight" for n in names}
    projections |= {fused for part, (fused, _, _) in before.parts.items() if part in projections}  # held as parts
    changed = []
    for name in sorted(before.files):
        if name in projections or name not in after:
            continue
        old, new = before.get(name), after.get(name)
        if old.shape != new.shape or not torch.equal(old, new):
            changed.append(name)
    return changed
