"""Triton LoRA shrink: the GPU twin of `reference.lora_shrink` (segmented gather matmul, SGMV).

Semantics (identical to the reference):
    h = zeros(num_tokens, num_slices, max_rank, fp32)
    for every token t with slot s = token_slots[t] >= 0, and every slice i with rank r = ranks[s, i]:
        h[t, i, :r] = x[t] @ lora_a[s, i, :r]^T
    Tokens without an adapter (slot -1) and padded rank columns (>= r) stay zero.

Kernel design:
    `LoRAKernelMeta` sorts the batch's tokens by adapter slot into one segment per active slot, so
    every adapter's A matrix is read once per tile of its tokens instead of once per token. One
    program per (token tile of a segment, rank tile, slice, segment): it gathers up to BLOCK_M token
    rows of x through `sorted_token_ids` (the batch is in any order), walks in_features in BLOCK_K
    tiles and accumulates x_tile @ A[slot, slice, r-tile, k-tile]^T in fp32 with tl.dot (tensor
    cores for fp16/bf16; exact IEEE fp32 for fp32). Programs past the end of their segment, and rank
    tiles starting at or beyond the slot's rank for that slice, return at once: padded rank columns
    are never read nor computed, so whatever the pool holds there (stale weights, NaN) is harmless.
    `h` is zero-filled first; the kernel writes only the computed entries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels import checks
from loraplex.kernels.lora_meta import LoRAKernelMeta


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # [num_tokens, in_features], unit stride along in_features
    a_ptr,  # [max_loras, num_slices, max_rank, in_features]
    h_ptr,  # [num_tokens, num_slices, max_rank] fp32, zero-filled
    ranks_ptr,  # [max_loras, num_slices]
    sorted_ids_ptr,  # [num_tokens] int32: token indices sorted by slot
    active_slots_ptr,  # [num_active] int32
    seg_starts_ptr,  # [num_active + 1] int32
    in_features,
    max_rank,
    num_r_tiles,  # cdiv(max_rank, BLOCK_R): axis 0 of the grid is (token tile, rank tile)
    stride_xt,
    stride_al, stride_as, stride_ar,
    stride_ht, stride_hs,
    stride_rl, stride_rs,
    BLOCK_M: tl.constexpr,  # tokens per tile (>= 16 for tl.dot)
    BLOCK_R: tl.constexpr,  # rank columns per tile (>= 16)
    BLOCK_K: tl.constexpr,  # in_features per step of the reduction (>= 16)
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    slice_id = tl.program_id(1)
    seg = tl.program_id(2)
    m_tile = pid // num_r_tiles
    r_tile = pid % num_r_tiles

    seg_start = tl.load(seg_starts_ptr + seg)
    seg_len = tl.load(seg_starts_ptr + seg + 1) - seg_start
    m_start = m_tile * BLOCK_M
    if m_start >= seg_len:  # the segment is shorter than the longest one
        return
    slot = tl.load(active_slots_ptr + seg).to(tl.int64)
    rank = tl.load(ranks_ptr + slot * stride_rl + slice_id * stride_rs).to(tl.int32)
    rank = tl.minimum(rank, max_rank)  # never read past the pool's padded rank
    r_start = r_tile * BLOCK_R
    if r_start >= rank:  # padded rank columns (and rank-0 slices) are not computed
        return

    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_len
    tokens = tl.load(sorted_ids_ptr + seg_start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = r_start + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)

    x_rows = x_ptr + tokens[:, None] * stride_xt  # [BLOCK_M, 1]
    a_cols = a_ptr + slot * stride_al + slice_id * stride_as + offs_r[None, :] * stride_ar  # [1, BLOCK_R]
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k_start in range(0, in_features, BLOCK_K):
        k = k_start + offs_k
        k_mask = k < in_features
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [M, K]
        a = tl.load(a_cols + k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)  # A^T: [K, R]
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)

    h_ptrs = h_ptr + tokens[:, None] * stride_ht + slice_id * stride_hs + offs_r[None, :]
    tl.store(h_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


def _check(
    x: torch.Tensor, lora_a: torch.Tensor, ranks: torch.Tensor, meta: LoRAKernelMeta, out: torch.Tensor | None
) -> None:
    checks.check_dims("x", x, "[num_tokens, in_features]")
    checks.check_dims("lora_a", lora_a, "[max_loras, num_slices, max_rank, in_features]")
    checks.check_float_dtype("x", x)
    checks.check_same_dtype("lora_a", lora_a, "x", x)
    max_loras, num_slices, max_rank, in_features = lora_a.shape
    if x.shape[1] != in_features:
        raise ValueError(f"x in_features {x.shape[1]} != lora_a in_features {in_features}")
    if num_slices < 1 or max_rank < 1:
        raise ValueError(f"lora_a needs >= 1 slice and max_rank >= 1, got {tuple(lora_a.shape)}")
    checks.check_unit_stride("x", x, 1, "in_features")
    checks.check_contiguous("lora_a", lora_a)
    device = x.device
    checks.check_device("lora_a", lora_a, device, "x")
    checks.check_shape("ranks", ranks, (max_loras, num_slices), f"[max_loras={max_loras}, num_slices={num_slices}]")
    checks.check_device("ranks", ranks, device)
    checks.check_dtype("ranks", ranks, checks.INDEX_DTYPES)
    checks.check_meta(meta, x.shape[0], device)
    if out is not None:
        shape = (x.shape[0], num_slices, max_rank)
        checks.check_shape("out", out, shape, f"[num_tokens, num_slices, max_rank] = {shape}")
        checks.check_dtype("out", out, (torch.float32,))
        checks.check_contiguous("out", out)
        checks.check_device("out", out, device)


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    meta: LoRAKernelMeta,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Project every token onto its adapter's A matrices: h[t, i, :r] = x[t] @ lora_a[slot, i, :r]^T.

    Same contract as `reference.lora_shrink(x, lora_a, ranks, meta.token_slots)` (see the module
    docstring).

    Shapes:
        x:       [num_tokens, in_features], fp16 / bf16 / fp32, unit stride along in_features
        lora_a:  [max_loras, num_slices, max_rank, in_features], x's dtype, contiguous
        ranks:   [max_loras, num_slices] int32 (0: slice not adapted; clamped to max_rank)
        meta:    the step's tokens sorted by slot (`LoRAKernelMeta.make(token_slots)`)
        out:     optional [num_tokens, num_slices, max_rank] fp32 contiguous buffer, overwritten
        returns: h, [num_tokens, num_slices, max_rank] fp32 (`out` when given)
    """
    return _lora_shrink(x, lora_a, ranks, meta, out)


def _lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    meta: LoRAKernelMeta,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_r: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """`lora_shrink` with optional tile-size overrides (tests use them to force tilings)."""
    _check(x, lora_a, ranks, meta, out)
    num_tokens = x.shape[0]
    _, num_slices, max_rank, in_features = lora_a.shape
    if out is None:
        out = torch.zeros((num_tokens, num_slices, max_rank), dtype=torch.float32, device=x.device)
    else:
        out.zero_()
    if meta.num_active == 0 or meta.max_seg_len == 0:
        return out

    # Untuned defaults: decode-sized segments get 16-row tiles and 16-column rank tiles (more
    # programs for the few segments of a decode step); prefill segments get bigger tiles.
    if block_m is None:
        block_m = min(64, max(16, triton.next_power_of_2(meta.max_seg_len)))
    if block_r is None:
        block_r = 16 if block_m == 16 else min(64, max(16, triton.next_power_of_2(max_rank)))
    if block_k is None:
        block_k = min(64, max(16, triton.next_power_of_2(in_features)))
    for name, value in (("block_m", block_m), ("block_r", block_r), ("block_k", block_k)):
        checks.check_block(name, value)

    num_r_tiles = triton.cdiv(max_rank, block_r)
    grid = (triton.cdiv(meta.max_seg_len, block_m) * num_r_tiles, num_slices, meta.num_active)
    _lora_shrink_kernel[grid](
        x, lora_a, out, ranks,
        meta.sorted_token_ids, meta.active_slots, meta.seg_starts,
        in_features, max_rank, num_r_tiles,
        x.stride(0),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        out.stride(0), out.stride(1),
        ranks.stride(0), ranks.stride(1),
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee",  # exact fp32 (no tf32); a no-op for fp16/bf16 operands
        num_warps=4,
    )
    return out
