"""Pure-torch twins of the Triton ops: each states its op's semantics (its `Semantics:` docstring)
as plainly as torch allows, and is the oracle of the kernel tests and of the torch paths' tests.

The production CPU path lives in torch_attention.py (attention) and backend.py (LoRA); these twins
are written independently of it, for clarity rather than speed.
"""

from __future__ import annotations

import torch


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
    """Causal attention of each query token over its sequence's paged keys and values.

    Sequence b owns query tokens query_start_loc[b]:query_start_loc[b+1] (its newest q_len_b
    tokens) and seq_lens[b] cached tokens, this step's included. Its i-th query token sits at
    position p = seq_lens[b] - q_len_b + i and attends to positions 0..p, or with a sliding
    `window` to the last `window` of them, max(0, p - window + 1)..p (transformers' sliding mask:
    key j is seen when j > p - window). `softcap` (Gemma 2) squashes each score s = q·k·scale to
    softcap·tanh(s / softcap) before the softmax.

    Semantics:
        for b in range(num_seqs):
            keys = concat(k_cache[block_tables[b, j]] for j)[:seq_lens[b]]     # [seq_len, Hkv, D]
            for i, t in enumerate(range(query_start_loc[b], query_start_loc[b+1])):
                p = seq_lens[b] - q_len_b + i
                lo = 0 if window is None else max(0, p - window + 1)
                s = query[t] @ keys[lo:p+1]^T * scale                 # per head,
                                                        # query head h reads kv head h // (H // Hkv)
                if softcap: s = softcap * tanh(s / softcap)
                out[t] = softmax(s) @ values[lo:p+1]

    Shapes:
        query:           [num_tokens, num_heads, head_dim]
        k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
        block_tables:    [num_seqs, max_blocks_per_seq] int32 (unused entries may hold any block)
        seq_lens:        [num_seqs] int32
        query_start_loc: [num_seqs + 1] int32
        returns:         [num_tokens, num_heads, head_dim], query's dtype (computed in fp32)
    """
    # As written above, one sequence at a time: no plan, no padding, no SDPA.
    num_heads = query.shape[1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[b], starts[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        blocks = block_tables[b, : -(-seq_len // block_size)].long()
        keys = k_cache[blocks].flatten(0, 1)[:seq_len].float()  # [seq_len, Hkv, D]
        values = v_cache[blocks].flatten(0, 1)[:seq_len].float()
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)  # [seq_len, H, D]
        scores = torch.einsum("qhd,khd->hqk", query[start:end].float(), keys) * scale  # [H, q_len, seq_len]
        positions = torch.arange(seq_len - q_len, seq_len, device=query.device)  # p of each query token
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        key_positions = torch.arange(seq_len, device=query.device)
        hidden = key_positions > positions.unsqueeze(1)  # [q_len, seq_len]: later keys
        if window is not None:
            hidden |= key_positions <= positions.unsqueeze(1) - window  # keys that slid out of the window
        scores = scores.masked_fill(hidden, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(query.dtype)
    return out


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
) -> torch.Tensor:
    """First half of the batched LoRA product: project each token to its adapter's low rank.

    Semantics:
        h = zeros(num_tokens, num_slices, max_rank, fp32)
        for t in range(num_tokens):
            s = token_slots[t]
            if s < 0: continue                                   # token without adapter
            for i in range(num_slices):
                r = ranks[s, i]                                   # 0: slice not adapted
                h[t, i, :r] = x[t] @ lora_a[s, i, :r]^T

    Shapes:
        x:           [num_tokens, in_features]
        lora_a:      [max_loras, num_slices, max_rank, in_features]
        ranks:       [max_loras, num_slices] int32
        token_slots: [num_tokens] int32, -1 = no adapter
        returns h:   [num_tokens, num_slices, max_rank] fp32
    """
    max_loras, num_slices, max_rank, _ = lora_a.shape
    h = x.new_zeros(x.shape[0], num_slices, max_rank, dtype=torch.float32)
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue
        rows = (token_slots == slot).nonzero().squeeze(1)
        for i in range(num_slices):
            r = int(ranks[slot, i])
            h[rows, i, :r] = x[rows].float() @ lora_a[slot, i, :r].float().T
    return h


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    slice_offsets: list[int],
) -> None:
    """Second half: add each token's adapter output, slice by slice, into `y` in place.

    Semantics:
        for t in range(num_tokens):
            s = token_slots[t]
            if s < 0: continue
            for i in range(num_slices):
                r = ranks[s, i]
                lo, hi = slice_offsets[i], slice_offsets[i + 1]
                y[t, lo:hi] += (h[t, i, :r] @ lora_b[s, lo:hi, :r]^T) * scales[s, i]

    Shapes:
        y:             [num_tokens, out_features] (the base layer's output)
        h:             [num_tokens, num_slices, max_rank] fp32, from lora_shrink
        lora_b:        [max_loras, out_features, max_rank]
        ranks:         [max_loras, num_slices] int32
        scales:        [max_loras, num_slices] fp32
        token_slots:   [num_tokens] int32, -1 = no adapter
        slice_offsets: num_slices + 1 ints, from 0 to out_features
    """
    num_slices = h.shape[1]
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue
        rows = (token_slots == slot).nonzero().squeeze(1)
        for i in range(num_slices):
            r = int(ranks[slot, i])
            lo, hi = slice_offsets[i], slice_offsets[i + 1]
            delta = (h[rows, i, :r] @ lora_b[slot, lo:hi, :r].float().T) * float(scales[slot, i])
            y[rows, lo:hi] += delta.to(y.dtype)


def sparse_add(y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor, crow: torch.Tensor, starts: torch.Tensor,
               cols: torch.Tensor, vals: torch.Tensor) -> None:
    """Each token's sparse delta S[slot] (CSR rows into flat entry tables), added in place: y += x @ S[slot]ᵀ.

    Semantics:
        for t in range(num_tokens):
            s = token_slots[t]
            if s < 0: continue
            for r in range(out_features):
                for e in range(starts[s] + crow[s, r], starts[s] + crow[s, r + 1]):
                    y[t, r] += vals[e] * x[t, cols[e]]

    Shapes:
        y:           [num_tokens, out_features]
        x:           [num_tokens, in_features]
        token_slots: [num_tokens] int, -1 = no adapter
        crow:        [num_slots, out_features + 1] int, each row's entries relative to the slot's start
        starts:      [num_slots] int64, where each slot's entries start in cols / vals
        cols, vals:  [num_entries] (int, float): the entries of every slot (`models/sparse_pool.py`)
    """
    out_features = y.shape[1]
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue
        tokens = (token_slots == slot).nonzero().squeeze(1)
        first = int(starts[slot])
        span = slice(first, first + int(crow[slot, -1]))
        counts = (crow[slot, 1:] - crow[slot, :-1]).long()
        rows = torch.repeat_interleave(torch.arange(out_features, device=y.device), counts)
        contrib = x[tokens][:, cols[span].long()].float() * vals[span].float()  # [n, nnz]
        delta = torch.zeros(len(tokens), out_features, device=y.device).index_add_(1, rows, contrib)
        y[tokens] += delta.to(y.dtype)
