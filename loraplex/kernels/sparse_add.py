"""Triton sparse add: the GPU twin of `reference.sparse_add` (each token's adapter-slot CSR delta).

Semantics (identical to the reference):
    for every token t with slot s = token_slots[t] >= 0, and every output row r:
        y[t, r] += sum(vals[e] * x[t, cols[e]] for e in starts[s] + range(crow[s, r], crow[s, r + 1]))
    in place, in y's dtype; tokens without an adapter (slot -1) leave y untouched. cols and vals are the
    flat entry tables of the model's sparse pool (`models/sparse_pool.py`), crow each slot's rows relative
    to where its entries start.

Kernel design:
    One program per (token, tile of BLOCK_R output rows). It reads the token's slot, then the tile's
    row extents from the slot's crow, and walks the entries of those rows in [BLOCK_R, BLOCK_E] tiles
    up to `max_row_nnz` (the longest row of any slot, a host int): gathers x[t, cols], multiplies by
    the values and sums each row in fp32. Each y element belongs to one program: no atomics. Rows of
    other slots are never read; an empty row costs its crow loads only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels import checks


@triton.jit
def _sparse_add_kernel(
    y_ptr,  # [num_tokens, out_features]
    x_ptr,  # [num_tokens, in_features]
    token_slots_ptr,  # [num_tokens] int32 or int64, -1 = no adapter
    crow_ptr,  # [num_slots, out_features + 1] int32 or int64, relative to the slot's start
    starts_ptr,  # [num_slots] int64: where each slot's entries start in cols / vals
    cols_ptr,  # [num_entries] int32 or int64
    vals_ptr,  # [num_entries]
    out_features,
    max_row_nnz,
    stride_yt, stride_xt, stride_crow,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    r_tile = tl.program_id(1)
    slot = tl.load(token_slots_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_r = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < out_features
    base = tl.load(starts_ptr + slot)
    starts = base + tl.load(crow_ptr + slot * stride_crow + offs_r, mask=r_mask, other=0).to(tl.int64)
    ends = base + tl.load(crow_ptr + slot * stride_crow + offs_r + 1, mask=r_mask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    offs_e = tl.arange(0, BLOCK_E)
    for e_start in range(0, max_row_nnz, BLOCK_E):
        e = starts[:, None] + e_start + offs_e[None, :]  # [BLOCK_R, BLOCK_E]
        e_mask = e < ends[:, None]
        cols = tl.load(cols_ptr + e, mask=e_mask, other=0)
        vals = tl.load(vals_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
        xs = tl.load(x_ptr + t * stride_xt + cols, mask=e_mask, other=0.0).to(tl.float32)
        acc += tl.sum(vals * xs, axis=1)
    y_ptrs = y_ptr + t * stride_yt + offs_r
    y = tl.load(y_ptrs, mask=r_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=r_mask)


def sparse_add(y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor, crow: torch.Tensor, starts: torch.Tensor,
               cols: torch.Tensor, vals: torch.Tensor, max_row_nnz: int, block_r: int | None = None,
               block_e: int = 16) -> None:
    """y [T, out] += each token's x [T, in] @ S[slot]ᵀ, S given per slot as CSR rows into flat entry tables
    (see module doc). max_row_nnz: the longest row of any slot a token names.
    block_r: output rows per program (default 32 on CUDA; on the CPU interpreter, where each program costs
    Python time, the whole output up to 1024 rows)."""
    checks.check_dims("y", y, "[num_tokens, out_features]")
    checks.check_dims("x", x, "[num_tokens, in_features]")
    checks.check_float_dtype("y", y)
    checks.check_same_dtype("x", x, "y", y)
    num_tokens, out_features = y.shape
    if x.shape[0] != num_tokens or token_slots.shape != (num_tokens,):
        raise ValueError(f"x has {x.shape[0]} tokens and token_slots {tuple(token_slots.shape)}; y has {num_tokens}")
    bad_crow = crow.ndim != 2 or crow.shape[1] != out_features + 1
    if bad_crow or starts.shape != (crow.shape[0],) or cols.ndim != 1 or cols.shape != vals.shape:
        raise ValueError(f"crow must be [num_slots, {out_features + 1}], starts [num_slots] and cols / vals "
                         f"[num_entries] alike, got {tuple(crow.shape)}, {tuple(starts.shape)}, "
                         f"{tuple(cols.shape)}, {tuple(vals.shape)}")
    checks.check_same_dtype("vals", vals, "y", y)
    for name, t in (("token_slots", token_slots), ("crow", crow), ("starts", starts), ("cols", cols)):
        checks.check_dtype(name, t, checks.INDEX_DTYPES)
    tensors = (("x", x), ("token_slots", token_slots), ("crow", crow), ("starts", starts), ("cols", cols),
               ("vals", vals))
    for name, t in tensors:
        checks.check_device(name, t, y.device, "y")
    for name, t in tensors[2:]:
        checks.check_contiguous(name, t)
    checks.check_unit_stride("y", y, 1, "out_features")
    checks.check_unit_stride("x", x, 1, "in_features")
    if num_tokens == 0 or max_row_nnz == 0:
        return
    if block_r is None:
        block_r = 32 if y.is_cuda else min(triton.next_power_of_2(out_features), 1024)
    grid = (num_tokens, triton.cdiv(out_features, block_r))
    _sparse_add_kernel[grid](
        y, x, token_slots, crow, starts, cols, vals, out_features, max_row_nnz,
        y.stride(0), x.stride(0), crow.stride(0),
        BLOCK_R=block_r, BLOCK_E=block_e,
    )
