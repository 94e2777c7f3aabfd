"""The pure-torch paged attention: the CPU path, and prefill on CUDA (see docs/architecture.md,
"Attention backends"). `plan_paged_attention` lays a step out once from the lengths on the host;
`attend_group` then runs each group of the plan with one SDPA call per layer.

Its oracle in the tests is the independent twin `reference.paged_attention`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store this step's keys and values in the paged cache.

    Semantics:
        for t in range(num_tokens):
            block, offset = divmod(slot_mapping[t], block_size)
            k_cache[block, offset] = key[t]
            v_cache[block, offset] = value[t]

    Shapes:
        key, value:      [num_tokens, num_kv_heads, head_dim]
        k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
        slot_mapping:    [num_tokens] int64
    """
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences attended together, their queries padded to the group's longest query."""

    token_index: torch.Tensor | None  # [group_tokens]: the step's tokens of this group; None = all, in order
    block_tables: torch.Tensor  # [group_seqs, blocks needed by its longest sequence] int64
    padded_index: torch.Tensor | None  # [group_tokens]: token -> row of [group_seqs * max_query_len]; None: uniform
    # [group_seqs, 1, max_query_len, max_kv_len] in the model's dtype, added to the scores: 0 = attend,
    # -inf = not (made once per step: SDPA would otherwise turn a bool mask into this in every layer);
    # None = see `fresh`
    mask: torch.Tensor | None
    max_query_len: int
    max_kv_len: int
    # Every sequence's queries start at position 0 (no cached context): the mask is SDPA's causal one
    # (padded rows sit after each sequence's own, so they never reach a real query), and the keys are
    # the step's own.
    fresh: bool = False
    uniform: bool = False  # every sequence has max_query_len queries: padding is a view
    seq_lens: tuple[int, ...] = ()  # each sequence's context length after this step
    query_lens: tuple[int, ...] = ()  # each sequence's new tokens
    # window (None: none) -> the additive mask of a sliding-window layer or a soft-capped one, made at the
    # first layer that asks and shared by the others
    _masks: dict = field(default_factory=dict, compare=False, repr=False)

    def explicit_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[group_seqs, 1, max_query_len, max_kv_len] additive mask: causal, and with a `window` each query at
        position p sees the keys p - window < j <= p only (padded query rows see key 0)."""
        if window not in self._masks:
            self._masks[window] = _position_mask(self.seq_lens, self.query_lens, self.max_query_len, self.max_kv_len,
                                                 self.block_tables.device, dtype, window)
        return self._masks[window]


@dataclass(frozen=True)
class AttentionPlan:
    """Per-step layout of the padded attention; built once per step, shared by every layer.

    Decodes and prompt chunks form separate groups, so one long chunk never pads every decode
    to its length."""

    groups: list[AttentionGroup]


def plan_paged_attention(block_tables: torch.Tensor, seq_lens: list[int], query_lens: list[int],
                         block_size: int, dtype: torch.dtype = torch.float32) -> AttentionPlan:
    """The step's layout from its lengths on the host (a few small tensors instead of a chain of
    tiny device ops); index tensors go to `block_tables`' device, masks are in `dtype` (the query's)."""
    decodes = [i for i, n in enumerate(query_lens) if n == 1]
    if len(decodes) in (0, len(query_lens)):
        selections = [None]  # one group: every sequence, tokens in order
    else:
        selections = [decodes, [i for i, n in enumerate(query_lens) if n != 1]]
    starts = list(itertools.accumulate(query_lens, initial=0))
    return AttentionPlan([
        _plan_group(block_tables, seq_lens, query_lens, starts, seqs, block_size, dtype) for seqs in selections
    ])


def _plan_group(block_tables: torch.Tensor, seq_lens: list[int], query_lens: list[int], starts: list[int],
                seqs: list[int] | None, block_size: int, dtype: torch.dtype) -> AttentionGroup:
    device = block_tables.device
    token_index = None
    if seqs is not None:
        token_index = torch.tensor([t for i in seqs for t in range(starts[i], starts[i + 1])], device=device)
        block_tables = block_tables[torch.tensor(seqs, device=device)]
        seq_lens, query_lens = [seq_lens[i] for i in seqs], [query_lens[i] for i in seqs]
    max_query_len, max_kv_len = max(query_lens), max(seq_lens)
    block_tables = block_tables[:, : -(-max_kv_len // block_size)].long()

    # Place the group's tokens in a padded [num_seqs, max_query_len] grid (a view when none is short).
    uniform = min(query_lens) == max_query_len
    padded_index = None
    if not uniform:
        padded_index = torch.tensor(
            [b * max_query_len + i for b, n in enumerate(query_lens) for i in range(n)], device=device
        )

    fresh = max_query_len > 1 and seq_lens == query_lens
    if fresh or max_query_len == 1 and min(seq_lens) == max_kv_len:
        mask = None  # SDPA's own causal mask, or decodes over one length that see every key
    else:  # decodes see their whole context; prompt chunks theirs, causally
        mask = _position_mask(seq_lens, query_lens, max_query_len, max_kv_len, device, dtype)
    return AttentionGroup(token_index, block_tables, padded_index, mask, max_query_len, max_kv_len, fresh, uniform,
                          tuple(seq_lens), tuple(query_lens))


def _position_mask(seq_lens, query_lens, max_query_len: int, max_kv_len: int, device: torch.device,
                   dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """[num_seqs, 1, max_query_len, max_kv_len] additive mask. Query i of sequence b sits at position
    p = seq_lens[b] - q_len_b + i (padded rows at 0) and sees keys j <= p, and with a `window` only those with
    j > p - window."""
    lens = torch.tensor(seq_lens, device=device).unsqueeze(1)  # [num_seqs, 1]
    first_pos = lens - torch.tensor(query_lens, device=device).unsqueeze(1)
    q_pos = first_pos + torch.arange(max_query_len, device=device).unsqueeze(0)
    q_pos = torch.where(q_pos < lens, q_pos, torch.zeros_like(q_pos)).unsqueeze(-1)  # [num_seqs, max_q, 1]
    kv_pos = torch.arange(max_kv_len, device=device).view(1, 1, -1)
    attend = kv_pos <= q_pos
    if window is not None:
        attend &= kv_pos > q_pos - window
    return _additive(attend.unsqueeze(1), dtype)


def _additive(attend: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask (True = attend) -> 0 / -inf in `dtype`, as SDPA adds it to the scores."""
    return torch.zeros(attend.shape, dtype=dtype, device=attend.device).masked_fill_(~attend, float("-inf"))


def paged_attention_planned(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan, scale: float,
    window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:
    """`reference.paged_attention`, with its layout computed beforehand by `plan_paged_attention`."""
    if len(plan.groups) == 1:
        return attend_group(query, k_cache, v_cache, plan.groups[0], scale, window=window, softcap=softcap)
    out = torch.empty_like(query)
    for group in plan.groups:
        out[group.token_index] = attend_group(query[group.token_index], k_cache, v_cache, group, scale,
                                              window=window, softcap=softcap)
    return out


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttentionGroup):
    """Each sequence's keys and values, [group_seqs, max_kv_len, num_kv_heads, head_dim] each."""
    return (gather_context(k_cache, group.block_tables, group.max_kv_len),
            gather_context(v_cache, group.block_tables, group.max_kv_len))


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """cache [num_blocks, block_size, H, D], block_tables [seqs, >= length / block_size] int64 ->
    [seqs, length, H, D]: each sequence's first `length` cached positions."""
    block_size = cache.shape[1]
    tables = block_tables[:, : -(-length // block_size)]
    # index_select of whole blocks: one contiguous copy per block, much faster than advanced indexing.
    blocks = cache.index_select(0, tables.flatten())
    return blocks.view(tables.shape[0], -1, *cache.shape[2:])[:, :length]


def attend_group(query, k_cache, v_cache, group: AttentionGroup, scale: float, kv=None,
                 window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """query: [group_tokens, num_heads, head_dim] -> the same shape. `kv`: the group's keys and
    values gathered already (see `gather_kv`). `window`, `softcap`: as `reference.paged_attention`."""
    num_heads, head_dim = query.shape[1:]
    num_seqs, max_query_len = group.block_tables.shape[0], group.max_query_len
    num_kv_heads = k_cache.shape[2]

    decode = max_query_len == 1  # one query per sequence, in sequence order: no padding needed
    if decode:
        # The query heads sharing a KV head become that head's query rows: SDPA then reads each key
        # once instead of once per query head (GQA without expanding K and V).
        padded_q = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    else:
        padded_q = pad_to_group(query, group).transpose(1, 2)

    keys, values = kv if kv is not None else gather_kv(k_cache, v_cache, group)
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [num_seqs, num_kv_heads, max_kv_len, head_dim]

    gqa = not decode and num_heads != num_kv_heads
    if window is not None and window >= group.max_kv_len:
        window = None  # no key of this group lies behind the window (Phi-4-mini's 262144 never does)
    if window is None and softcap is None:
        out = F.scaled_dot_product_attention(
            padded_q, keys, values, attn_mask=group.mask, is_causal=group.fresh, scale=scale, enable_gqa=gqa,
        )  # [num_seqs, num_heads, max_query_len, head_dim]; decode: [num_seqs, num_kv_heads, group, head_dim]
    else:
        mask = group.explicit_mask(window, query.dtype)
        if softcap is None:
            out = F.scaled_dot_product_attention(padded_q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
        else:
            out = _softcapped_attention(padded_q, keys, values, mask, scale, softcap, gqa)
    if decode:
        return out.reshape(num_seqs, num_heads, head_dim)
    out = out.transpose(1, 2).reshape(num_seqs * max_query_len, num_heads, head_dim)
    return out if group.uniform else out[group.padded_index]


# Scores a soft-capped attention holds at once (fp32 elements): the queries go through in blocks under it, so a
# long prefill chunk does not hold [seqs, heads, chunk, context] scores whole (Gemma 2 27B, 4096 x 8192: 8 GB)
SOFTCAP_SCORE_ELEMENTS = 1 << 25


def _softcapped_attention(query, keys, values, mask, scale: float, softcap: float, gqa: bool) -> torch.Tensor:
    """SDPA with each score s squashed to softcap·tanh(s / softcap) before the mask and the softmax (which SDPA
    cannot do), computed as transformers' eager Gemma 2 attention: scores in the query's dtype, softmax in fp32.
    query [seqs, heads, q, D], mask [seqs, 1, q or 1, kv]."""
    if gqa:
        group = query.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    seqs, heads, rows, _ = query.shape
    step = max(1, SOFTCAP_SCORE_ELEMENTS // (seqs * heads * keys.shape[2]))
    out = []
    for start in range(0, rows, step):
        block_mask = mask if mask.shape[2] == 1 else mask[:, :, start:start + step]
        scores = torch.matmul(query[:, :, start:start + step], keys.transpose(-1, -2)).mul_(scale)
        scores = torch.tanh(scores.div_(softcap)).mul_(softcap).add_(block_mask)
        out.append(torch.matmul(scores.softmax(-1, dtype=torch.float32).to(query.dtype), values))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def pad_to_group(x: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """[group_tokens, heads, head_dim] -> [group_seqs, max_query_len, heads, head_dim], each
    sequence's tokens first, zeros after."""
    num_seqs = group.block_tables.shape[0]
    if group.uniform:
        return x.view(num_seqs, group.max_query_len, *x.shape[1:])
    padded = x.new_zeros(num_seqs * group.max_query_len, *x.shape[1:])
    padded.index_copy_(0, group.padded_index, x)
    return padded.view(num_seqs, group.max_query_len, *x.shape[1:])
