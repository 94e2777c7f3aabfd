"""Triton LoRA expand: the GPU twin of `reference.lora_expand` (segmented gather matmul, SGMV).

Semantics (identical to the reference):
    for every token t with slot s = token_slots[t] >= 0, and every slice i with rank r = ranks[s, i]:
        lo, hi = slice_offsets[i], slice_offsets[i + 1]
        y[t, lo:hi] += (h[t, i, :r] @ lora_b[s, lo:hi, :r]^T) * scales[s, i]
    in place, in y's dtype; tokens without an adapter (slot -1) and rank-0 slices leave y untouched.

Kernel design:
    Tokens come grouped by adapter slot (`LoRAKernelMeta`), so every B tile is read once per tile
    of its segment's tokens. One program per (token tile of a segment, output tile of the slice,
    slice, segment): it gathers up to BLOCK_M rows of h through `sorted_token_ids`, walks the slot's
    rank for that slice in BLOCK_R tiles -- only up to that rank, so padded rank columns of h and B
    are never read -- and accumulates h_tile @ B[slot, lo + n-tile, r-tile]^T in fp32 with tl.dot.
    It then scales by scales[slot, slice], adds the y tile (in fp32) and stores it back in y's dtype.
    Programs past the end of their segment or slice, and rank-0 slices, return at once. Each y
    element belongs to exactly one program, so the read-modify-write needs no atomics.
    For fp16/bf16 weights the h tile is cast to the weight dtype so the dot runs on tensor cores
    (the usual SGMV choice; a relative error of ~1e-3 (fp16) / ~4e-3 (bf16) on the LoRA delta,
    below the rounding of y itself); fp32 weights use an exact IEEE fp32 dot.
"""

from __future__ import annotations

import operator
from itertools import pairwise

import torch
import triton
import triton.language as tl

from loraplex.kernels import checks
from loraplex.kernels.lora_meta import LoRAKernelMeta

# slice_offsets live on the device as a tiny int32 tensor; cache it so that the per-layer,
# per-step call does no host-to-device copy (which would also break CUDA graph capture).
_OFFSETS_CACHE: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


@triton.jit
def _lora_expand_kernel(
    y_ptr,  # [num_tokens, out_features], unit stride along out_features
    h_ptr,  # [num_tokens, num_slices, max_rank] fp32
    b_ptr,  # [max_loras, out_features, max_rank]
    ranks_ptr,  # [max_loras, num_slices]
    scales_ptr,  # [max_loras, num_slices] fp32
    slice_offsets_ptr,  # [num_slices + 1] int32
    sorted_ids_ptr,  # [num_tokens] int32: token indices sorted by slot
    active_slots_ptr,  # [num_active] int32
    seg_starts_ptr,  # [num_active + 1] int32
    max_rank,
    num_n_tiles,  # cdiv(max_slice_out, BLOCK_N): axis 0 of the grid is (token tile, output tile)
    stride_yt,
    stride_ht, stride_hs,
    stride_bl, stride_bn,
    stride_rl, stride_rs,
    stride_sl, stride_ss,
    BLOCK_M: tl.constexpr,  # tokens per tile (>= 16 for tl.dot)
    BLOCK_N: tl.constexpr,  # output features per tile (>= 16)
    BLOCK_R: tl.constexpr,  # rank columns per step of the reduction (>= 16)
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    slice_id = tl.program_id(1)
    seg = tl.program_id(2)
    m_tile = pid // num_n_tiles
    n_tile = pid % num_n_tiles

    seg_start = tl.load(seg_starts_ptr + seg)
    seg_len = tl.load(seg_starts_ptr + seg + 1) - seg_start
    m_start = m_tile * BLOCK_M
    if m_start >= seg_len:  # the segment is shorter than the longest one
        return
    lo = tl.load(slice_offsets_ptr + slice_id)
    hi = tl.load(slice_offsets_ptr + slice_id + 1)
    n_start = lo + n_tile * BLOCK_N
    if n_start >= hi:  # the slice is narrower than the widest one
        return
    slot = tl.load(active_slots_ptr + seg).to(tl.int64)
    rank = tl.load(ranks_ptr + slot * stride_rl + slice_id * stride_rs).to(tl.int32)
    rank = tl.minimum(rank, max_rank)  # never read past the pool's padded rank
    if rank <= 0:  # slice not adapted by this slot: y stays as it is
        return
    scale = tl.load(scales_ptr + slot * stride_sl + slice_id * stride_ss).to(tl.float32)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_len
    tokens = tl.load(sorted_ids_ptr + seg_start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hi
    offs_r = tl.arange(0, BLOCK_R)

    h_rows = h_ptr + tokens[:, None] * stride_ht + slice_id * stride_hs  # [BLOCK_M, 1]
    b_cols = b_ptr + slot * stride_bl + offs_n[None, :].to(tl.int64) * stride_bn  # [1, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r_start in range(0, rank, BLOCK_R):
        r = r_start + offs_r
        r_mask = r < rank
        b = tl.load(b_cols + r[:, None], mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # B^T: [R, N]
        h = tl.load(h_rows + r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # [M, R]
        acc = tl.dot(h.to(b.dtype), b, acc, input_precision=DOT_PRECISION)

    y_ptrs = y_ptr + tokens[:, None] * stride_yt + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc * scale).to(y_ptr.dtype.element_ty), mask=y_mask)


def _slice_offsets_tensor(slice_offsets: list[int], device: torch.device) -> torch.Tensor:
    key = (tuple(slice_offsets), device)
    t = _OFFSETS_CACHE.get(key)
    if t is None:
        t = torch.tensor(slice_offsets, dtype=torch.int32, device=device)
        _OFFSETS_CACHE[key] = t
    return t


def _check(
    y: torch.Tensor,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoRAKernelMeta,
    slice_offsets: list[int],
) -> None:
    checks.check_dims("y", y, "[num_tokens, out_features]")
    checks.check_dims("h", h, "[num_tokens, num_slices, max_rank]")
    checks.check_dims("lora_b", lora_b, "[max_loras, out_features, max_rank]")
    checks.check_float_dtype("y", y)
    checks.check_same_dtype("lora_b", lora_b, "y", y)
    checks.check_dtype("h", h, (torch.float32,), " (lora_shrink's output)")
    num_tokens, out_features = y.shape
    _, num_slices, max_rank = h.shape
    max_loras = lora_b.shape[0]
    if h.shape[0] != num_tokens:
        raise ValueError(f"h has {h.shape[0]} tokens, y has {num_tokens}")
    if num_slices < 1 or max_rank < 1:
        raise ValueError(f"h needs >= 1 slice and max_rank >= 1, got {tuple(h.shape)}")
    checks.check_shape("lora_b", lora_b, (max_loras, out_features, max_rank),
                f"[max_loras, out_features={out_features}, max_rank={max_rank}]")
    _check_slice_offsets(slice_offsets, num_slices, out_features)
    checks.check_unit_stride("y", y, 1, "out_features")
    checks.check_contiguous("h", h)
    checks.check_contiguous("lora_b", lora_b)
    device = y.device
    checks.check_device("h", h, device, "y")
    checks.check_device("lora_b", lora_b, device, "y")
    per_slot_slice = (max_loras, num_slices)
    layout = f"[max_loras={max_loras}, num_slices={num_slices}]"
    checks.check_shape("ranks", ranks, per_slot_slice, layout)
    checks.check_device("ranks", ranks, device)
    checks.check_dtype("ranks", ranks, checks.INDEX_DTYPES)
    checks.check_shape("scales", scales, per_slot_slice, layout)
    checks.check_device("scales", scales, device)
    checks.check_dtype("scales", scales, (torch.float32,))
    checks.check_meta(meta, num_tokens, device)


def _check_slice_offsets(slice_offsets: list[int], num_slices: int, out_features: int) -> None:
    """num_slices + 1 ints, strictly increasing from 0 to out_features (slice i: y[:, lo:hi])."""
    try:
        offsets = [operator.index(o) for o in slice_offsets]
    except TypeError:
        raise ValueError(f"slice_offsets must be a list of ints, got {slice_offsets!r}") from None
    if len(offsets) != num_slices + 1:
        raise ValueError(f"slice_offsets must hold num_slices + 1 = {num_slices + 1} ints, got {len(offsets)}")
    if offsets[0] != 0 or offsets[-1] != out_features:
        raise ValueError(f"slice_offsets must run from 0 to y's out_features {out_features}, got {offsets}")
    if any(b <= a for a, b in pairwise(offsets)):
        raise ValueError(f"slice_offsets must be strictly increasing, got {offsets}")


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoRAKernelMeta,
    slice_offsets: list[int],
) -> None:
    """Add every token's adapter output into `y` in place, slice by slice.

    Same contract as `reference.lora_expand(y, h, lora_b, ranks, scales, meta.token_slots,
    slice_offsets)` (see the module docstring).

    Shapes:
        y:             [num_tokens, out_features], fp16 / bf16 / fp32, unit stride along out_features
        h:             [num_tokens, num_slices, max_rank] fp32 contiguous, from lora_shrink
        lora_b:        [max_loras, out_features, max_rank], y's dtype, contiguous
        ranks:         [max_loras, num_slices] int32 (0: slice not adapted; clamped to max_rank)
        scales:        [max_loras, num_slices] fp32
        meta:          the step's tokens sorted by slot (`LoRAKernelMeta.make(token_slots)`)
        slice_offsets: num_slices + 1 ints, strictly increasing from 0 to out_features
    """
    _lora_expand(y, h, lora_b, ranks, scales, meta, slice_offsets)


def _lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoRAKernelMeta,
    slice_offsets: list[int],
    block_m: int | None = None,
    block_n: int | None = None,
    block_r: int | None = None,
) -> None:
    """`lora_expand` with optional tile-size overrides (tests use them to force tilings)."""
    _check(y, h, lora_b, ranks, scales, meta, slice_offsets)
    if meta.num_active == 0 or meta.max_seg_len == 0:
        return
    num_slices, max_rank = h.shape[1:]
    slice_offsets = [operator.index(o) for o in slice_offsets]
    max_slice_out = max(b - a for a, b in pairwise(slice_offsets))

    # Untuned defaults: token tiles sized to the longest segment, 64-wide output tiles, and the
    # whole rank in one reduction step up to rank 64.
    if block_m is None:
        block_m = min(64, max(16, triton.next_power_of_2(meta.max_seg_len)))
    if block_n is None:
        block_n = min(64, max(16, triton.next_power_of_2(max_slice_out)))
    if block_r is None:
        block_r = min(64, max(16, triton.next_power_of_2(max_rank)))
    for name, value in (("block_m", block_m), ("block_n", block_n), ("block_r", block_r)):
        checks.check_block(name, value)

    offsets = _slice_offsets_tensor(slice_offsets, y.device)
    num_n_tiles = triton.cdiv(max_slice_out, block_n)
    grid = (triton.cdiv(meta.max_seg_len, block_m) * num_n_tiles, num_slices, meta.num_active)
    _lora_expand_kernel[grid](
        y, h, lora_b, ranks, scales, offsets,
        meta.sorted_token_ids, meta.active_slots, meta.seg_starts,
        max_rank, num_n_tiles,
        y.stride(0),
        h.stride(0), h.stride(1),
        lora_b.stride(0), lora_b.stride(1),
        ranks.stride(0), ranks.stride(1),
        scales.stride(0), scales.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        DOT_PRECISION="ieee",  # exact fp32 (no tf32); a no-op for fp16/bf16 operands
        num_warps=4,
    )
