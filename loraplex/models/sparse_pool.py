"""One device pool for the sparse parts of every adapter in a slot (`--max-sparse-memory`).

The pool is three flat tensors of entries, allocated once: output row, input column and value (the
model's dtype). The indices are int32 on CUDA (the Triton kernel reads them) and int64 on the CPU (torch's
gather and scatter take no other, and converting them every step cost a fifth of the sparse term): an
entry takes 8 + 2 or 4 bytes on CUDA, 16 + 4 on the CPU. Each slot holding an adapter with sparse parts owns
one contiguous range of entries, its layers' entries one after another; each layer keeps where its part
starts inside the range (`sparse_parts.SparseSlotParts`). Position 0 is a zero entry that is never
allocated: padded lookups point there and add nothing.

Ranges are placed first-fit; when the free entries suffice but no gap does, the ranges are moved to the
front (compaction), which changes only the slots' `base`: layers read `base` at every step, so nothing
else is rewritten.
"""

from __future__ import annotations

import torch

from loraplex.errors import invalid


def index_dtype(device: torch.device) -> torch.dtype:
    return torch.int32 if device.type == "cuda" else torch.int64


def entry_bytes(dtype: torch.dtype, device: torch.device) -> int:
    """An entry's row, column and value."""
    return 2 * index_dtype(device).itemsize + dtype.itemsize


class SparsePool:
    def __init__(self, capacity: int, max_loras: int, dtype: torch.dtype, device: torch.device) -> None:
        if capacity < 1:
            raise invalid("max_sparse_memory", "leaves no room for a single sparse entry; give 0 to serve no "
                          "sparse adapters, or more memory")
        if capacity >= 2**31 - 1:  # (int32 indices on CUDA)
            raise invalid("max_sparse_memory", f"holds {capacity} entries; at most 2^31 - 2 are addressable")
        self.capacity = capacity  # entries that ranges may take (position 0 aside)
        self.dtype, self.device = dtype, device
        # empty, not zeros: on the CPU untouched pages cost no memory until an adapter is written there
        self.rows = torch.empty(capacity + 1, dtype=index_dtype(device), device=device)
        self.cols = torch.empty(capacity + 1, dtype=index_dtype(device), device=device)
        self.vals = torch.empty(capacity + 1, dtype=dtype, device=device)
        self.rows[0], self.cols[0], self.vals[0] = 0, 0, 0.0
        self.ranges: dict[int, tuple[int, int]] = {}  # slot -> (start, entries)
        self.base = torch.zeros(max_loras + 1, dtype=torch.int64, device=device)  # slot -> start; last: slot -1
        self.used = 0
        self.compactions = 0

    @classmethod
    def from_bytes(cls, budget: int, max_loras: int, dtype: torch.dtype, device: torch.device) -> SparsePool:
        return cls(budget // entry_bytes(dtype, device) - 1, max_loras, dtype, device)

    @property
    def entry_bytes(self) -> int:
        return entry_bytes(self.dtype, self.device)

    @property
    def length(self) -> int:
        """Entries in each table: the zero entry and the capacity."""
        return self.capacity + 1

    @staticmethod
    def windows(table: torch.Tensor, width: int) -> torch.Tensor:
        """A [length - width + 1, width] view of `table`: row p holds entries p .. p + width - 1."""
        return table.as_strided((table.numel() - width + 1, width), (1, 1))

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def start(self, slot: int) -> int:
        return self.ranges[slot][0]

    def allocate(self, slot: int, entries: int) -> int:
        """A range of `entries` for `slot` (replacing the slot's range); returns its start. The caller makes
        room first: `entries` <= `free` once the slot's old range is released."""
        self.release(slot)
        if entries > self.free:
            raise RuntimeError(f"sparse pool: {entries} entries asked for, {self.free} free")
        if entries == 0:
            return 0
        start = self._first_fit(entries)
        if start is None:
            self._compact()
            start = self._first_fit(entries)
        self.ranges[slot] = (start, entries)
        self.base[slot] = start
        self.used += entries
        return start

    def release(self, slot: int) -> None:
        held = self.ranges.pop(slot, None)
        if held is not None:
            self.used -= held[1]
            self.base[slot] = 0

    def write(self, start: int, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
        end = start + rows.numel()
        self.rows[start:end].copy_(rows)
        self.cols[start:end].copy_(cols)
        self.vals[start:end].copy_(vals)

    def _first_fit(self, entries: int) -> int | None:
        position = 1
        for start, length in sorted(self.ranges.values()):
            if start - position >= entries:
                return position
            position = start + length
        return position if self.capacity + 1 - position >= entries else None

    def _compact(self) -> None:
        """Move every range to the front, in order (each lands at or below where it was)."""
        position = 1
        for slot, (start, length) in sorted(self.ranges.items(), key=lambda item: item[1][0]):
            if start != position:
                for table in (self.rows, self.cols, self.vals):
                    table[position:position + length] = table[start:start + length].clone()
                self.ranges[slot] = (position, length)
                self.base[slot] = position
            position += length
        self.compactions += 1
