"""Argument checks shared by the Triton launchers: each raises ValueError naming the argument.

The kernels read raw pointers, so a tensor of the wrong dtype, device or layout would be read as
garbage (or out of bounds) rather than fail; every launcher checks its arguments with these first.
"""

from __future__ import annotations

import torch

from loraplex.kernels.lora_meta import LoRAKernelMeta

# What the kernels compute in (tl.dot takes fp16/bf16 on tensor cores, fp32 as exact IEEE).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# What index tensors (ranks, block tables, lengths) may hold; the kernels widen them to int64.
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_dims(name: str, t: torch.Tensor, layout: str) -> None:
    """`t` has one dimension per name in `layout`, e.g. "[num_tokens, in_features]"."""
    if t.dim() != layout.count(",") + 1:
        raise ValueError(f"{name} must be {layout}, got {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], layout: str) -> None:
    """`t` has exactly `shape`; `layout` spells it out for the message, e.g. "[max_loras=4, num_slices=3]"."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be {layout}, got {tuple(t.shape)}")


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    """`t` is in one of the dtypes the kernels compute in."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} dtype {t.dtype} not supported, expected one of {FLOAT_DTYPES}")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """`t` has `ref`'s dtype (the kernels load both into one tl.dot)."""
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} dtype {t.dtype} must match {ref_name} dtype {ref.dtype}")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...], why: str = "") -> None:
    """`t.dtype` is one of `allowed`; `why` (e.g. " (lora_shrink's output)") follows the dtype in the message."""
    if t.dtype not in allowed:
        raise ValueError(f"{name} must be {_dtype_names(allowed)}{why}, got {t.dtype}")


def check_device(name: str, t: torch.Tensor, device: torch.device, ref_name: str | None = None) -> None:
    """`t` is on `device` (`ref_name`: the argument `device` was taken from, for the message)."""
    if t.device != device:
        expected = f"{ref_name}'s device {device}" if ref_name else str(device)
        raise ValueError(f"{name} is on {t.device}, expected {expected}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    """`t` is contiguous (the kernel derives every address from its leading strides)."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_unit_stride(name: str, t: torch.Tensor, dim: int, axis: str) -> None:
    """`t`'s dimension `dim` (called `axis`) has stride 1: rows may be a strided view (of a fused
    projection, say), but the kernel loads along this axis with unit steps. A dimension of size 1
    has no steps, so any stride does."""
    if t.stride(dim) != 1 and t.shape[dim] > 1:
        raise ValueError(f"{name} must be contiguous along {axis}")


def check_block(name: str, value: int) -> None:
    """A tile size: tl.arange needs a power of two and tl.dot at least 16 along every axis."""
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def check_meta(meta: LoRAKernelMeta, num_tokens: int, device: torch.device) -> None:
    """The step's token layout (see lora_meta.py) fits `num_tokens` tokens on `device`: every index
    tensor int32, contiguous, of the length its fields promise."""
    if not isinstance(meta, LoRAKernelMeta):
        raise ValueError(f"meta must be a LoRAKernelMeta, got {type(meta).__name__}")
    if meta.active_slots.dim() != 1:
        raise ValueError(f"meta.active_slots must be 1-D, got {tuple(meta.active_slots.shape)}")
    num_active = meta.active_slots.shape[0]
    expected = {
        "token_slots": (num_tokens,),
        "sorted_token_ids": (num_tokens,),
        "active_slots": (num_active,),
        "seg_starts": (num_active + 1,),
    }
    for field, shape in expected.items():
        name, t = f"meta.{field}", getattr(meta, field)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for {num_tokens} tokens, got {tuple(t.shape)}")
        check_dtype(name, t, (torch.int32,))
        check_device(name, t, device)
        check_contiguous(name, t)
    if meta.max_seg_len < 0 or meta.max_seg_len > num_tokens:
        raise ValueError(f"meta.max_seg_len {meta.max_seg_len} out of range for {num_tokens} tokens")
