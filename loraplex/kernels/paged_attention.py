"""Triton paged attention: the GPU twin of `reference.paged_attention`, tuned for decode.

Semantics (identical to the reference):
    Sequence b owns the query tokens query_start_loc[b]:query_start_loc[b+1] -- its newest q_len_b
    tokens -- and seq_lens[b] tokens in the paged cache, this step's tokens already written there.
    Its i-th query token sits at position p = seq_lens[b] - q_len_b + i and attends causally to the
    cached positions 0..p of its own sequence, which live in the blocks block_tables[b, 0], [b, 1], ...
    Query head h reads kv head h // (num_heads // num_kv_heads) (grouped-query attention).
    With a sliding `window` it attends to positions max(0, p - window + 1)..p only; with `softcap`
    each score s = q·k·scale becomes softcap·tanh(s / softcap) before the softmax (Gemma 2).
    Every query token is independent, so a batch may mix decode tokens (q_len 1) and prefill chunks.

Kernel design:
    One program per (query token, kv head). It handles the whole GQA group of that kv head -- the
    `group` query heads sharing it, padded to a power of two >= 16 rows so Q @ K^T and P @ V run on
    tensor cores via tl.dot -- so each K/V tile is read from memory once per group, not once per head.
    The program walks the token's context 0..p (from the tile holding a window's first key) in tiles
    of BLOCK_N keys; the physical block of every key is gathered from the block table, so a tile may
    span several cache blocks (or part of one).
    Softmax is computed online (running max and denominator, base-2 exponent with the scale folded
    in) with fp32 accumulation; the output is written in the query dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels import checks

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    out_ptr,  # [num_tokens, num_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq]
    token_seq_ptr,  # [num_tokens] int32: sequence of each query token
    token_ctx_len_ptr,  # [num_tokens] int32: keys seen by each token (its position + 1)
    qk_scale,  # softmax scale * log2(e)
    window,  # keys seen back from the query's own position, itself included; 0: all
    softcap_log2,  # softcap * log2(e): scores s become softcap * tanh(s / softcap); 0.0: none
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_bt_seq, stride_bt_blk,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_G: tl.constexpr,  # GROUP padded to a power of two >= 16 (tl.dot minimum)
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to >= 16
    BLOCK_N: tl.constexpr,  # keys per tile
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,  # softcap > 0
):
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)

    seq = tl.load(token_seq_ptr + token).to(tl.int64)
    ctx_len = tl.load(token_ctx_len_ptr + token)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g  # query heads of this group, [BLOCK_G]

    # Q of the whole group: [BLOCK_G, BLOCK_D]; padded rows/columns are zero.
    q_ptrs = q_ptr + token * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    bt_row = block_tables_ptr + seq * stride_bt_seq
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh

    first = 0  # the first key seen
    if window > 0:
        first = tl.maximum(ctx_len - window, 0)
    for start in range((first // BLOCK_N) * BLOCK_N, ctx_len, BLOCK_N):
        pos = start + offs_n  # logical key positions, [BLOCK_N]
        n_mask = (pos < ctx_len) & (pos >= first)
        # Physical block of every key (int64: the cache may exceed 2**31 elements).
        block = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_bt_blk, mask=n_mask, other=0).to(tl.int64)
        slot = (pos % BLOCK_SIZE).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]

        # K^T tile [BLOCK_D, BLOCK_N], V tile [BLOCK_N, BLOCK_D].
        k_ptrs = k_head + block[None, :] * stride_kb + slot[None, :] * stride_ks + offs_d[:, None]
        k = tl.load(k_ptrs, mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        v_ptrs = v_head + block[:, None] * stride_vb + slot[:, None] * stride_vs + offs_d[None, :]
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)

        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N] fp32
        if SOFTCAP:  # s is log2(e) times the score, so the cap is too; tanh(x) = 1 - 2 / (e^2x + 1)
            s = softcap_log2 * (1.0 - 2.0 / (tl.exp(2.0 * (s / softcap_log2)) + 1.0))
        s = tl.where(n_mask[None, :], s, float("-inf"))

        # Each tile holds >= 1 valid key, so m_new is finite and no row turns into NaN.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = out_ptr + token * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def _check(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> None:
    checks.check_dims("query", query, "[num_tokens, num_heads, head_dim]")
    checks.check_dims("k_cache", k_cache, "[num_blocks, block_size, num_kv_heads, head_dim]")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    checks.check_float_dtype("query", query)
    checks.check_same_dtype("k_cache", k_cache, "query", query)
    checks.check_same_dtype("v_cache", v_cache, "query", query)
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} != query head_dim {head_dim}")
    if head_dim <= 0 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"query head_dim must be a power of two <= 256, got {head_dim}")
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"query num_heads {num_heads} is not a multiple of k_cache num_kv_heads {num_kv_heads}"
        )
    checks.check_unit_stride("query", query, 2, "head_dim")
    checks.check_contiguous("k_cache", k_cache)
    checks.check_contiguous("v_cache", v_cache)
    checks.check_dims("seq_lens", seq_lens, "[num_seqs]")
    num_seqs = seq_lens.shape[0]
    checks.check_dims("block_tables", block_tables, "[num_seqs, max_blocks]")
    if block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must be [num_seqs={num_seqs}, max_blocks], got {tuple(block_tables.shape)}"
        )
    checks.check_shape("query_start_loc", query_start_loc, (num_seqs + 1,), f"[num_seqs + 1 = {num_seqs + 1}]")
    device = query.device
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        checks.check_device(name, t, device, "query")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        checks.check_dtype(name, t, checks.INDEX_DTYPES)
        checks.check_device(name, t, device, "query")


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal paged attention of each query token over its own sequence's cached keys and values.

    Same contract as `reference.paged_attention` (see the module docstring).

    Shapes:
        query:           [num_tokens, num_heads, head_dim], fp16 / bf16 / fp32
        k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim], query's dtype, contiguous
        block_tables:    [num_seqs, max_blocks_per_seq] int32 (unused entries may hold any block)
        seq_lens:        [num_seqs] int32
        query_start_loc: [num_seqs + 1] int32
        returns:         [num_tokens, num_heads, head_dim], query's dtype
    """
    return _paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                            window=window, softcap=softcap)


def _paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    block_n: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """`paged_attention` with an optional keys-per-tile override (tests use it to force tilings)."""
    _check(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 (or None: no window), got {window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None: none), got {softcap}")
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out

    # Per-token sequence and context length, on device without a host sync (output_size is known).
    # Token t of sequence b sits at p = seq_lens[b] - q_len_b + (t - qsl[b]) = seq_lens[b] - qsl[b+1] + t.
    num_seqs = seq_lens.shape[0]
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    token_seq = torch.repeat_interleave(
        torch.arange(num_seqs, device=query.device, dtype=torch.int32), query_lens, output_size=num_tokens
    )
    token_idx = torch.arange(num_tokens, device=query.device, dtype=torch.int32)
    token_ctx_len = (seq_lens[token_seq] - query_start_loc[1:][token_seq] + token_idx + 1).to(torch.int32)

    group = num_heads // num_kv_heads
    if block_n is None:
        block_n = 64 if head_dim <= 128 else 32  # keeps the K and V tiles within registers
    checks.check_block("block_n", block_n)

    grid = (num_tokens, num_kv_heads)
    _paged_attention_kernel[grid](
        query, k_cache, v_cache, out, block_tables, token_seq, token_ctx_len,
        scale * _LOG2E, window or 0, float(softcap or 0.0) * _LOG2E,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0), block_tables.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, head_dim),
        BLOCK_N=block_n,
        DOT_PRECISION="ieee",  # exact fp32 (no tf32); a no-op for fp16/bf16 operands
        SOFTCAP=bool(softcap),
        num_warps=4 if head_dim <= 128 else 8,
    )
    return out
