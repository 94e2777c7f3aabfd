"""A contiguous copy of the decoding sequences' keys and values, for the torch attention path.

Gathering every sequence's blocks out of the paged cache costs a full copy of the context per
layer per step. A decoding sequence only adds one key and one value per step, so this mirror keeps
row i of a per-layer buffer for the i-th decode of the step: a row that decoded in the step before
is kept (moved up when sequences before it left) and appended to in place; only a sequence that was
not decoding in the step before (it just finished its prompt, or was preempted) is gathered from
the paged cache, and only its own row. The paged cache stays the source of truth.

The buffers are kept from step to step, so steady decoding touches no new memory (on the CPU a
fresh allocation of this size costs page faults on every touch). They are sized from the current
decodes (rows x longest context, with half again as many rows and a quarter more length in
reserve), grow keeping their rows when the decodes outgrow them, and are reallocated smaller when
they have exceeded four times that size for _SHRINK_AFTER decode steps in a row: then at most
about eight times the decoding batch's keys and values, about twice after a resize. The delay keeps
a batch's last few stragglers, and the next batch after them, from reallocating (fresh memory costs
a page fault per page on first touch: about 10 ms per layer for a 64 x 256-token batch). An idle
engine keeps its buffers until decoding resumes.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from loraplex.kernels.torch_attention import gather_context

# Room for at least this many more decode steps is reserved when a buffer grows.
_HEADROOM = 64
# Buffers more than this many times the size the current decodes would get are reallocated at it.
_SHRINK_AT = 4
# ... for this many decode steps in a row (steps with no decodes do not count).
_SHRINK_AFTER = 64


@dataclass
class _Plan:
    """How this step's rows come from the last step's; applied once per layer by `update`."""

    num_rows: int
    moves: list[tuple[int, int]]  # (destination row, source row), destination < source, ascending
    gathered: list[int]  # rows filled from the paged cache
    positions: list[int]  # where each row's new key goes
    max_len: int
    slots: torch.Tensor | None = None  # [num_rows * num_kv_heads] the new keys' rows in a flat buffer
    gather_rows: torch.Tensor | slice | None = None  # the gathered rows, as an index
    gather_tables: torch.Tensor | None = None  # [len(gathered), blocks] their block tables


def _buffer_shape(num_rows: int, max_len: int) -> tuple[int, int]:
    """(rows, length) of buffers for these decodes: half again as many rows, a quarter more length
    (at least _HEADROOM positions) in reserve."""
    return num_rows + num_rows // 2, max_len + max(_HEADROOM, max_len // 4)


class DecodeKVCache:
    def __init__(self) -> None:
        self._rows: dict[Hashable, tuple[int, int]] = {}  # seq id -> (row, cached length) after the last step
        self._shape = (0, 0)  # (rows, length) every layer's buffers have room for
        self._oversized_steps = 0  # decode steps in a row that had buffers over _SHRINK_AT times their need
        # per layer: k, v, each [rows, num_kv_heads, length, head_dim]
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._updated: set[int] = set()  # layers that applied this step's plan
        self._plan: _Plan | None = None
        self.num_gathered = 0  # rows gathered from the paged cache in the last step (for tests and stats)

    @property
    def active(self) -> bool:
        return self._plan is not None

    def begin_step(self, seq_ids: Sequence[Hashable], seq_lens: Sequence[int]) -> None:
        """Plan the step for the decodes `seq_ids` (in batch order), whose contexts are `seq_lens`
        long after this step. No decodes: the mirror rests and forgets its rows."""
        self._updated.clear()
        if not seq_ids:
            self._plan, self._rows, self.num_gathered = None, {}, 0
            return
        rows, length = self._shape
        num_rows, max_len = len(seq_ids), max(seq_lens)
        target = _buffer_shape(num_rows, max_len)
        oversized = rows * length > _SHRINK_AT * target[0] * target[1]
        self._oversized_steps = self._oversized_steps + 1 if oversized else 0
        if num_rows > rows or max_len > length or self._oversized_steps > _SHRINK_AFTER:
            self._resize(target)
            self._oversized_steps = 0
        moves, gathered = [], []
        for row, (seq_id, seq_len) in enumerate(zip(seq_ids, seq_lens, strict=True)):
            source, cached = self._rows.get(seq_id, (-1, -1))
            # Kept only if it decoded in the last step and its row can move up without overwriting a
            # row still to be read (rows are visited in ascending order, and sources never go below).
            if cached == seq_len - 1 and source >= row:
                if source != row:
                    moves.append((row, source))
            else:
                gathered.append(row)
        self._rows = {seq_id: (row, n) for row, (seq_id, n) in enumerate(zip(seq_ids, seq_lens, strict=True))}
        self._plan = _Plan(len(seq_ids), moves, gathered, [n - 1 for n in seq_lens], max_len)
        self.num_gathered = len(gathered)

    def _resize(self, shape: tuple[int, int]) -> None:
        # Each layer moves its rows into the new buffers when it next updates, if they fit there;
        # if not (the buffers shrank), every row is gathered again.
        rows, length = self._shape
        self._shape = shape
        if shape[0] < rows or shape[1] < length:
            self._rows = {}

    def update(self, k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               block_tables: torch.Tensor) -> None:
        """Bring this layer's rows up to date after this step's keys went into the paged cache.

        key, value: [num_rows, num_kv_heads, head_dim], the decodes' new keys in row order.
        block_tables: [num_rows, blocks] of the decoding sequences, for the rows gathered.
        """
        plan, layer = self._plan, k_cache.data_ptr()
        if layer in self._updated:
            return
        self._updated.add(layer)
        k, v = self._buffers.get(layer) or self._allocate(k_cache)
        if (k.shape[0], k.shape[2]) != self._shape:
            k, v = self._allocate(k_cache, k, v)
        self._buffers[layer] = k, v
        for dst, src in plan.moves:
            k[dst, :, : plan.max_len].copy_(k[src, :, : plan.max_len])
            v[dst, :, : plan.max_len].copy_(v[src, :, : plan.max_len])
        rows, num_kv_heads, length, head_dim = k.shape
        if plan.slots is None:  # the same for every layer
            heads = torch.arange(num_kv_heads)
            starts = torch.tensor(plan.positions) + torch.arange(plan.num_rows) * (num_kv_heads * length)
            plan.slots = (starts.unsqueeze(1) + heads * length).flatten().to(k.device)
        k.view(-1, head_dim).index_copy_(0, plan.slots, key.reshape(-1, head_dim).to(k.dtype))
        v.view(-1, head_dim).index_copy_(0, plan.slots, value.reshape(-1, head_dim).to(v.dtype))
        if plan.gathered:
            if plan.gather_rows is None:  # the same for every layer
                every = plan.gathered == list(range(plan.num_rows))
                index = torch.tensor(plan.gathered, device=k.device)
                plan.gather_rows = slice(0, plan.num_rows) if every else index
                plan.gather_tables = block_tables if every else block_tables[index]
            for cache, buffer in ((k_cache, k), (v_cache, v)):
                context = gather_context(cache, plan.gather_tables, plan.max_len)  # [rows, max_len, H, D]
                buffer[plan.gather_rows, :, : plan.max_len] = context.transpose(1, 2)

    def _allocate(self, cache: torch.Tensor, *old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_kv_heads, head_dim = cache.shape[2:]
        shape = (self._shape[0], num_kv_heads, self._shape[1], head_dim)
        # Zeros, not empty: positions past a sequence's length still enter the product with V
        # (masked to weight 0) and 0 * NaN is NaN; later they hold other sequences' finite keys.
        new = cache.new_zeros(shape), cache.new_zeros(shape)
        for src, dst in zip(old, new, strict=False):  # no old buffers on the first allocation
            if src.shape[0] <= shape[0] and src.shape[2] <= shape[2]:  # else every row is gathered again
                dst[: src.shape[0], :, : src.shape[2]] = src
        return new

    def keys_values(self, k_cache: torch.Tensor, max_kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's [num_rows, max_kv_len, num_kv_heads, head_dim] keys and values (views of
        head-major buffers: each head's keys are contiguous, as SDPA reads them)."""
        k, v = self._buffers[k_cache.data_ptr()]
        n = self._plan.num_rows
        return k[:n, :, :max_kv_len].transpose(1, 2), v[:n, :, :max_kv_len].transpose(1, 2)
