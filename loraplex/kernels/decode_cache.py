"""A contiguous copy of the running batch's keys and values, for the torch decode path.

Gathering every sequence's blocks out of the paged cache costs a full copy of the context per
layer per step. While the same sequences decode step after step, each only adds one key and one
value: this cache keeps the last gather and appends to it in place, and gathers again only when
the batch changes (a sequence joins, finishes, or is preempted), a prompt chunk runs, or the copy
is full. The paged cache stays the source of truth; this is a per-layer mirror of it.
"""

from __future__ import annotations

import torch

from loraplex.kernels.reference import AttentionGroup, gather_kv

# Room for this many more decode steps is reserved at each gather.
_HEADROOM = 64


class DecodeKVCache:
    def __init__(self) -> None:
        self._batch: tuple[str, ...] | None = None  # sequence ids of the last decode step
        self._lens: list[int] = []
        self._capacity = 0
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer: k, v
        self.active = False  # this step is a decode step served from the mirror
        self.appending = False  # ... and appends to it (else it is rebuilt)
        self._positions: torch.Tensor | None = None  # [num_seqs]: where this step's keys go

    def begin_step(self, seq_ids: tuple[str, ...] | None, seq_lens: list[int], decode_only: bool) -> None:
        self.active = decode_only and seq_ids is not None
        if not self.active:
            self._batch, self.appending = None, False
            self._buffers.clear()
            return
        grown = self._batch == seq_ids and all(n == m + 1 for n, m in zip(seq_lens, self._lens, strict=True))
        self.appending = grown and max(seq_lens) <= self._capacity
        if not self.appending:
            self._buffers.clear()
            self._capacity = max(seq_lens) + _HEADROOM
        self._batch, self._lens = seq_ids, list(seq_lens)
        self._positions = torch.tensor([n - 1 for n in seq_lens])

    def append(self, k_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """key, value: [num_seqs, num_kv_heads, head_dim], one new token per sequence, in batch order."""
        k, v = self._buffers[k_cache.data_ptr()]
        rows = torch.arange(key.shape[0])
        k[rows, self._positions] = key
        v[rows, self._positions] = value

    def keys_values(self, k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttentionGroup):
        """This layer's [num_seqs, max_kv_len, num_kv_heads, head_dim] keys and values."""
        layer = k_cache.data_ptr()
        if layer not in self._buffers:
            keys, values = gather_kv(k_cache, v_cache, group)
            shape = (keys.shape[0], self._capacity, *keys.shape[2:])
            # Zeros, not empty: masked-out rows still enter the product with V, and 0 * NaN is NaN.
            k, v = keys.new_zeros(shape), values.new_zeros(shape)
            k[:, : keys.shape[1]], v[:, : values.shape[1]] = keys, values
            self._buffers[layer] = (k, v)
        k, v = self._buffers[layer]
        return k[:, : group.max_kv_len], v[:, : group.max_kv_len]
