"""One layer's view of the slots' sparse parts: y[t] += x[t] @ S[slot(t)]ᵀ, S never made dense.

The entries live in the model's `SparsePool`. A slot's entries of this layer (one CSR matrix per slice of a
fused layer, the slices in output order) are contiguous there, sorted by output row, starting at
`pool.base[slot] + offsets[slot]`; `crow[slot]` gives each output row's entries relative to that start.
Row -1 of each table (the last) belongs to token slot -1: no entries.

Two ways to apply them, the same sum:
  - gather (steps with few tokens, e.g. decodes): every token reads a window of the pool as wide as the
    longest part among the batch's slots, starting at its slot's part (one contiguous copy per token,
    through a strided view of the pool), the window's entries past the part masked out; then
    y[t, rows[e]] += vals[e] · x[t, cols[e]] (a gather, a multiply, a scatter-add; no loop over slots);
  - per slot (steps whose tokens x entries would be large, e.g. long prefills): one sparse-dense product
    per active slot.
The Triton backend reads the same tables (`csr_view`).
"""

from __future__ import annotations

import torch

from loraplex.models.sparse_pool import SparsePool

GATHER_LIMIT = 1 << 22  # tokens x padded entries up to which the gather path runs (16 MiB of fp32)


class SparseSlotParts:
    def __init__(self, pool: SparsePool, max_loras: int, slice_offsets: list[int], in_features: int) -> None:
        self.pool = pool
        self.slice_offsets = slice_offsets
        self.in_features = in_features
        device = pool.device
        out_features = slice_offsets[-1]
        self.offsets = torch.zeros(max_loras + 1, dtype=torch.int64, device=device)  # from the slot's base
        self.counts = torch.zeros(max_loras + 1, dtype=torch.int64, device=device)
        self.crow = torch.zeros(max_loras + 1, out_features + 1, dtype=torch.int32, device=device)
        self.offsets_host = [0] * max_loras
        self.counts_host = [0] * max_loras
        self.max_row_nnz_host = [0] * max_loras

    @staticmethod
    def entries(csrs: list[torch.Tensor | None]) -> int:
        return sum(int(csr._nnz()) for csr in csrs if csr is not None)

    def write(self, slot: int, csrs: list[torch.Tensor | None], offset: int) -> int:
        """Put the slot's part of this layer (per slice, S [out_slice, in] as a CSR tensor, or None) at `offset`
        in the slot's pool range (allocated by the caller); returns the entries written."""
        rows, cols, vals = [], [], []
        for i, csr in enumerate(csrs):
            if csr is not None and csr._nnz():
                coo = csr.to_sparse_coo().coalesce()  # row-major order
                rows.append(coo.indices()[0] + self.slice_offsets[i])
                cols.append(coo.indices()[1])
                vals.append(coo.values())
        count = sum(r.numel() for r in rows)
        self.offsets_host[slot], self.counts_host[slot] = offset, count
        self.offsets[slot], self.counts[slot] = offset, count
        if count == 0:
            self.crow[slot] = 0
            self.max_row_nnz_host[slot] = 0
            return 0
        row = torch.cat(rows)
        start = self.pool.start(slot) + offset
        self.pool.write(start, row, torch.cat(cols), torch.cat(vals))  # (copy_ converts)
        per_row = torch.bincount(row, minlength=self.slice_offsets[-1])
        self.crow[slot, 0] = 0
        self.crow[slot, 1:] = per_row.cumsum(0).to(self.crow.device, torch.int32)
        self.max_row_nnz_host[slot] = int(per_row.max())
        return count

    def clear(self, slot: int) -> None:
        self.write(slot, [], 0)

    def any(self, slots: list[int]) -> bool:
        return any(self.counts_host[s] for s in slots)

    def starts(self) -> torch.Tensor:
        """[max_loras + 1] int64: where each slot's entries of this layer start in the pool."""
        return self.pool.base + self.offsets

    def csr_view(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(crow, starts, the pool's cols, the pool's vals, the longest row among `slots`) for the Triton kernel
        (`kernels/sparse_add`)."""
        max_row_nnz = max((self.max_row_nnz_host[s] for s in slots), default=0)
        return self.crow, self.starts(), self.pool.cols, self.pool.vals, max_row_nnz

    def add(self, y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor, active_slots: list[int],
            seg_starts: list[int], sorted_token_ids: torch.Tensor) -> None:
        """y [T, out] += each token's x [T, in] @ S[its slot]ᵀ (slot -1 or a slot without parts: nothing).

        Semantics: for every token t with slot s >= 0 and every entry (r, c, v) of slot s's S:
        y[t, r] += v · x[t, c]."""
        width = max((self.counts_host[s] for s in active_slots), default=0)
        if width == 0:
            return
        pool = self.pool
        # every active slot's tokens read a window, those without entries in this layer too (from where their
        # part would start: possibly the end of their range, the pool's end)
        last_start = max(pool.ranges.get(s, (0, 0))[0] + self.offsets_host[s] for s in active_slots)
        if x.shape[0] * width <= GATHER_LIMIT:
            index = token_slots.long()  # -1: the last row (start 0, no entries)
            starts = self.starts()[index]  # [T]
            padding = torch.arange(width, device=x.device) >= self.counts[index, None]  # [T, width]
            if last_start + width <= pool.length:  # every window inside the pool
                rows, cols, vals = (pool.windows(table, width).index_select(0, starts)
                                    for table in (pool.rows, pool.cols, pool.vals))
            else:
                entries = (starts[:, None] + torch.arange(width, device=x.device)).clamp_(max=pool.length - 1)
                rows, cols, vals = pool.rows[entries], pool.cols[entries], pool.vals[entries]
            # past its part, a window holds other parts' entries, or entries never written (the pool is allocated
            # empty: any value): their values masked, their indices clamped into this layer's shape (they then
            # add zeros)
            cols = cols.long().clamp_(0, self.in_features - 1)
            rows = rows.long().clamp_(0, self.slice_offsets[-1] - 1)
            y.scatter_add_(1, rows, (x.gather(1, cols) * vals.masked_fill_(padding, 0)).to(y.dtype))
            return
        shape = (self.slice_offsets[-1], self.in_features)
        for a, slot in enumerate(active_slots):
            count = self.counts_host[slot]
            if count == 0:
                continue
            start = pool.start(slot) + self.offsets_host[slot]
            csr = torch.sparse_csr_tensor(self.crow[slot].long(), pool.cols[start:start + count].long(),
                                          pool.vals[start:start + count].float(), shape)
            tokens = sorted_token_ids[seg_starts[a]:seg_starts[a + 1]].long()
            y[tokens] += (csr @ x[tokens].T.float()).T.to(y.dtype)  # fp32: CPU has no fp16 CSR mm
