"""loraplex's sparse-delta adapter format: per module a CSR matrix S with ΔW = S (no scale), for sparse
fine-tuning and diff pruning. Specification: docs/adapters.md.

    adapter_config.json   {"loraplex_format": "sparse-delta", "format_version": 1,
                           "base_model_name_or_path": ..., "target_modules": [full module names],
                           "density": nnz / (out·in) over all modules, "dtype": "float16" | ...}
    adapter_model.safetensors, per module (e.g. base_model.model.model.layers.0.self_attn.q_proj):
        <module>.sparse_delta.values         [nnz]     float16 | bfloat16 | float32
        <module>.sparse_delta.crow_indices   [out + 1] int32 | int64: row r holds entries crow[r]:crow[r+1]
        <module>.sparse_delta.col_indices    [nnz]     int32 | int64: strictly increasing within a row
        <module>.sparse_delta.shape          [2]       int64: (out, in)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraplex.errors import invalid

FORMAT_NAME = "sparse-delta"
FORMAT_VERSION = 1
SUFFIXES = ("values", "crow_indices", "col_indices", "shape")
_KEY = re.compile(r"^base_model\.model\.(model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+))\.sparse_delta\.(\w+)$")
INDEX_DTYPES = (torch.int32, torch.int64)
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_FROBENIUS = 1e4  # as MAX_LORA_NORM: ||S||_2 <= ||S||_F, and real deltas are orders of magnitude below


@dataclass(frozen=True)
class SparseDelta:
    """One module's S in CSR, validated: y += x @ Sᵀ."""

    crow: torch.Tensor  # [out + 1] int64
    col: torch.Tensor  # [nnz] int64
    values: torch.Tensor  # [nnz] fp32
    shape: tuple[int, int]  # (out, in)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    @property
    def num_bytes(self) -> int:
        return self.crow.nbytes + self.col.nbytes + self.values.nbytes

    def to_torch(self, device=None, dtype=None) -> torch.Tensor:
        """A torch sparse CSR tensor (for `S @ xᵀ` without densifying)."""
        return torch.sparse_csr_tensor(self.crow.to(device), self.col.to(device),
                                       self.values.to(device=device, dtype=dtype), self.shape,
                                       check_invariants=False)  # parse_module checked them once

    def dense(self) -> torch.Tensor:
        """[out, in]: for tests and references only."""
        return self.to_torch().to_dense()


def is_sparse_delta(config: dict) -> bool:
    return config.get("loraplex_format") == FORMAT_NAME


def check_config(config: dict, max_density: float) -> None:
    if config.get("format_version") != FORMAT_VERSION:
        raise _config_error(f"format_version must be {FORMAT_VERSION}, got {config.get('format_version')!r}")
    density = config.get("density")
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1:
        raise _config_error(f"density must be a number in (0, 1], got {density!r}")
    if density > max_density:
        raise _config_error(f"density {density:g} is above the {max_density:g} this server takes "
                            f"(--max-sparse-density); prune the delta further, or raise the limit")


def parse_module(full_name: str, parts: dict[str, torch.Tensor], expected_shape: tuple[int, int] | None,
                 max_density: float) -> SparseDelta:
    """Check one module's CSR tensors (named by suffix) and return them as a SparseDelta. Refusals are
    LoraplexError on adapter_model.safetensors naming the module."""
    missing = [s for s in SUFFIXES if s not in parts]
    if missing:
        raise _weights_error(f"{full_name}: sparse_delta.{missing[0]} is missing")
    shape_t, crow, col, values = parts["shape"], parts["crow_indices"], parts["col_indices"], parts["values"]
    if shape_t.dtype not in INDEX_DTYPES or tuple(shape_t.shape) != (2,):
        raise _weights_error(f"{full_name}: sparse_delta.shape must be 2 integers (out, in)")
    shape = (int(shape_t[0]), int(shape_t[1]))
    if expected_shape is not None and shape != expected_shape:
        raise _weights_error(f"{full_name}: the sparse delta is {shape[0]}x{shape[1]} but the base model's "
                             f"projection is {expected_shape[0]}x{expected_shape[1]}; made for another base model?")
    if min(shape) < 1:
        raise _weights_error(f"{full_name}: sparse_delta.shape {shape} is empty")
    for name, tensor, dtypes in (("crow_indices", crow, INDEX_DTYPES), ("col_indices", col, INDEX_DTYPES),
                                 ("values", values, VALUE_DTYPES)):
        if tensor.ndim != 1 or tensor.dtype not in dtypes:
            raise _weights_error(f"{full_name}: sparse_delta.{name} must be a vector of "
                                 f"{' or '.join(str(d).removeprefix('torch.') for d in dtypes)}")
    out_features, in_features = shape
    crow, col = crow.long(), col.long()
    nnz = values.numel()
    if crow.numel() != out_features + 1 or int(crow[0]) != 0 or int(crow[-1]) != nnz or col.numel() != nnz:
        raise _weights_error(f"{full_name}: crow_indices must have out + 1 = {out_features + 1} entries from 0 to "
                             f"nnz = {nnz}, and col_indices nnz entries")
    if bool((crow[1:] < crow[:-1]).any()):
        raise _weights_error(f"{full_name}: crow_indices must not decrease")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= in_features):
        raise _weights_error(f"{full_name}: a column index is outside 0..{in_features - 1}")
    row_of = torch.repeat_interleave(torch.arange(out_features), crow[1:] - crow[:-1])
    same_row = row_of[1:] == row_of[:-1]
    if bool((col[1:][same_row] <= col[:-1][same_row]).any()):
        raise _weights_error(f"{full_name}: col_indices must be strictly increasing within each row (sorted, "
                             "no repeats); coalesce the matrix before saving")
    values = values.float()
    if not bool(torch.isfinite(values).all()):
        raise _weights_error(f"{full_name}: sparse_delta.values holds NaN or infinite values")
    if nnz / (out_features * in_features) > max_density:
        raise _weights_error(f"{full_name}: density {nnz / (out_features * in_features):.4g} is above "
                             f"--max-sparse-density {max_density:g}; prune it further, or raise the limit")
    if float(values.norm()) > MAX_FROBENIUS:
        raise _weights_error(f"{full_name}: the delta's Frobenius norm {float(values.norm()):.3g} is above "
                             f"{MAX_FROBENIUS:g}; its values are scaled wrong")
    return SparseDelta(crow=crow.contiguous(), col=col.contiguous(), values=values.contiguous(), shape=shape)


def split_key(key: str) -> tuple[str, int, str, str] | None:
    """(full module name, layer, module, suffix) of a sparse-delta tensor key, or None."""
    match = _KEY.match(key)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), match.group(3), match.group(4)


def write_sparse_delta(deltas: dict[str, SparseDelta], directory: Path, base_model: str | None = None,
                       dtype: torch.dtype = torch.float16) -> Path:
    """`deltas`: full module name (model.layers.0.self_attn.q_proj) -> S. Writes the two files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, delta in sorted(deltas.items()):
        prefix = f"base_model.model.{name}.sparse_delta"
        tensors[f"{prefix}.values"] = delta.values.to("cpu", dtype).contiguous()
        tensors[f"{prefix}.crow_indices"] = delta.crow.to("cpu", torch.int64).contiguous()
        tensors[f"{prefix}.col_indices"] = delta.col.to("cpu", torch.int32 if delta.shape[1] < 2**31 else
                                                        torch.int64).contiguous()
        tensors[f"{prefix}.shape"] = torch.tensor(delta.shape, dtype=torch.int64)
    nnz = sum(d.nnz for d in deltas.values())
    size = sum(d.shape[0] * d.shape[1] for d in deltas.values())
    config = {"loraplex_format": FORMAT_NAME, "format_version": FORMAT_VERSION, "base_model_name_or_path": base_model,
              "target_modules": sorted(deltas), "density": nnz / size if size else 0.0,
              "dtype": str(dtype).removeprefix("torch.")}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def from_dense(matrix: torch.Tensor) -> SparseDelta:
    """The CSR of a dense [out, in] matrix's non-zero entries."""
    csr = matrix.to_sparse_csr()
    return SparseDelta(crow=csr.crow_indices().long(), col=csr.col_indices().long(), values=csr.values().float(),
                       shape=(matrix.shape[0], matrix.shape[1]))


def _config_error(message: str):
    return invalid("adapter_config.json", message)


def _weights_error(message: str):
    return invalid("adapter_model.safetensors", message)

