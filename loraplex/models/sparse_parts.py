"""The sparse parts of the adapters in one layer's slots: y[t] += x[t] @ S[slot(t)]ᵀ, S never made dense.

Each slot's parts (one CSR matrix per slice of a fused layer) are kept as one list of entries (output
row, input column, value) over the whole output. Two ways to apply them, the same sum:
  - gather (every step with few tokens, e.g. decodes): the entries of all slots padded into
    [max_loras + 1, E] tables (the last row empty: token slot -1), then for all tokens at once
    y[t, rows[s_t, e]] += vals[s_t, e] · x[t, cols[s_t, e]] (a gather, a multiply, a scatter-add; no loop
    over slots);
  - per slot (steps whose tokens x entries would be large, e.g. long prefills): one sparse-dense
    product S_slot @ x[tokens of the slot]ᵀ per active slot.
"""

from __future__ import annotations

import torch

GATHER_LIMIT = 1 << 22  # tokens x padded entries up to which the gather path runs (16 MiB of fp32)


class SparseSlotParts:
    def __init__(self, max_loras: int, slice_offsets: list[int], in_features: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.max_loras = max_loras
        self.slice_offsets = slice_offsets
        self.in_features = in_features
        self.dtype, self.device = dtype, device
        # per slot, per slice: (rows, cols, values) of S's entries in that slice, rows relative to the slice
        self.parts: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]] = [
            [None] * (len(slice_offsets) - 1) for _ in range(max_loras)]
        self._tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, cols, vals
        self._csr_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        self._csr: dict[int, torch.Tensor] = {}  # slot -> its CSR over the whole output
        self._slots: set[int] = set()  # slots with some part

    def write(self, slot: int, slice_index: int, csr: torch.Tensor | None) -> None:
        """One slice's S [out_slice, in] as a CSR tensor, or None."""
        if csr is None:
            if self.parts[slot][slice_index] is None:
                return
            self.parts[slot][slice_index] = None
        else:
            coo = csr.to_sparse_coo().coalesce()
            rows, cols = coo.indices()
            self.parts[slot][slice_index] = (rows.to(self.device), cols.to(self.device),
                                             coo.values().to(self.device, self.dtype))
        self._tables = self._csr_tables = None
        self._csr.pop(slot, None)
        if any(part is not None for part in self.parts[slot]):
            self._slots.add(slot)
        else:
            self._slots.discard(slot)

    def any(self, slots: list[int]) -> bool:
        return bool(self._slots) and not self._slots.isdisjoint(slots)

    def add(self, y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor, active_slots: list[int],
            seg_starts: list[int], sorted_token_ids: torch.Tensor) -> None:
        """y [T, out] += each token's x [T, in] @ S[its slot]ᵀ (slot -1 or a slot without parts: nothing).

        Semantics: for every token t with slot s >= 0 and every entry (r, c, v) of slot s's S:
        y[t, r] += v · x[t, c]."""
        tables = self._tables or self._build_tables()
        rows, cols, vals = tables
        if x.shape[0] * rows.shape[1] <= GATHER_LIMIT:
            index = token_slots.long()  # -1: the last, empty row (a no-op when it is int64 already)
            contrib = x.gather(1, cols[index]) * vals[index]  # [T, E]
            y.scatter_add_(1, rows[index], contrib.to(y.dtype))
            return
        for a, slot in enumerate(active_slots):
            if not any(part is not None for part in self.parts[slot]):
                continue
            tokens = sorted_token_ids[seg_starts[a]:seg_starts[a + 1]].long()
            y[tokens] += (self._slot_csr(slot) @ x[tokens].T.float()).T.to(y.dtype)  # fp32: CPU has no fp16 CSR mm

    def _entries(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The slot's entries over the whole output (slice rows shifted to their place)."""
        rows, cols, vals = [], [], []
        for i, part in enumerate(self.parts[slot]):
            if part is not None:
                rows.append(part[0] + self.slice_offsets[i])
                cols.append(part[1])
                vals.append(part[2])
        if not rows:
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            return empty, empty, torch.zeros(0, dtype=self.dtype, device=self.device)
        return torch.cat(rows), torch.cat(cols), torch.cat(vals)

    def _build_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        entries = [self._entries(s) for s in range(self.max_loras)]
        width = max(max(e[0].numel() for e in entries), 1)
        rows = torch.zeros(self.max_loras + 1, width, dtype=torch.long, device=self.device)
        cols = torch.zeros_like(rows)
        vals = torch.zeros(self.max_loras + 1, width, dtype=self.dtype, device=self.device)
        for s, (r, c, v) in enumerate(entries):  # padding: (0, 0, 0.0), which adds nothing
            rows[s, : r.numel()], cols[s, : c.numel()], vals[s, : v.numel()] = r, c, v
        self._tables = (rows, cols, vals)
        return self._tables

    def csr_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(crow [max_loras + 1, out + 1], cols [max_loras + 1, E], vals [max_loras + 1, E], the longest row's
        entries): every slot's S in CSR over the whole output, for the Triton kernel (`kernels/sparse_add`)."""
        if self._csr_tables is None:
            rows, cols, vals = self._tables or self._build_tables()
            out_features = self.slice_offsets[-1]
            counts = torch.zeros(self.max_loras + 1, out_features, dtype=torch.long, device=self.device)
            for s in range(self.max_loras):
                n = self._entries(s)[0].numel()
                counts[s] = torch.bincount(rows[s, :n], minlength=out_features)
            crow = torch.zeros(self.max_loras + 1, out_features + 1, dtype=torch.long, device=self.device)
            crow[:, 1:] = counts.cumsum(dim=1)
            self._csr_tables = (crow, cols.contiguous(), vals.contiguous(), int(counts.max()))
        return self._csr_tables

    def _slot_csr(self, slot: int) -> torch.Tensor:
        if slot not in self._csr:
            rows, cols, vals = self._entries(slot)
            out_features = self.slice_offsets[-1]
            coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals.float(), (out_features, self.in_features))
            self._csr[slot] = coo.coalesce().to_sparse_csr()
        return self._csr[slot]
