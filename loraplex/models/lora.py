"""Adapter slots inside the model: every adaptable linear layer holds the stacked LoRA weights of
`max_loras` slots, and adds the adapters' outputs of a batch in one pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRASlotWeights:
    """The stacked LoRA weights of one linear layer (several checkpoint projections when fused).

    Invariant: entries beyond a slot's rank are zero, so the torch path may compute up to the
    largest active rank without masking.
    """

    a: torch.Tensor  # [max_loras, num_slices, max_rank, in_features]
    b: torch.Tensor  # [max_loras, out_features, max_rank]
    ranks: torch.Tensor  # [max_loras, num_slices] int32 (0 = this slot leaves the slice alone)
    scales: torch.Tensor  # [max_loras, num_slices] fp32
    slice_offsets: list[int]  # num_slices + 1 row offsets into out_features
    ranks_host: list[list[int]]  # ranks, on the host: sizes the torch path without a device sync
    # DoRA: each slot's per-output-row factor m / ||W + s·B·A|| (1 where the slot's adapter is not DoRA); the
    # last row is all ones, so that token slot -1 (no adapter) indexes it.
    row_factors: torch.Tensor  # [max_loras + 1, out_features] fp32
    dora_host: list[list[bool]]  # [max_loras][num_slices]: which slices of a slot have a factor
    # Sparse parts: [max_loras][num_slices] a CSR tensor [out_slice, in] on the device, or None.
    sparse: list[list[torch.Tensor | None]]

    @classmethod
    def allocate(cls, max_loras: int, max_rank: int, in_features: int, output_sizes: list[int],
                 dtype: torch.dtype, device: torch.device) -> LoRASlotWeights:
        num_slices = len(output_sizes)
        offsets = [0]
        for size in output_sizes:
            offsets.append(offsets[-1] + size)
        return cls(
            a=torch.zeros(max_loras, num_slices, max_rank, in_features, dtype=dtype, device=device),
            b=torch.zeros(max_loras, offsets[-1], max_rank, dtype=dtype, device=device),
            ranks=torch.zeros(max_loras, num_slices, dtype=torch.int32, device=device),
            scales=torch.zeros(max_loras, num_slices, dtype=torch.float32, device=device),
            slice_offsets=offsets,
            ranks_host=[[0] * num_slices for _ in range(max_loras)],
            row_factors=torch.ones(max_loras + 1, offsets[-1], dtype=torch.float32, device=device),
            dora_host=[[False] * num_slices for _ in range(max_loras)],
            sparse=[[None] * num_slices for _ in range(max_loras)],
        )

    def write(self, slot: int, slice_index: int, a: torch.Tensor, b: torch.Tensor, scale: float,
              row_factors: torch.Tensor | None = None) -> None:
        """Put one projection's A [rank, in] and B [out_slice, rank] into a slot, and for DoRA its factors
        [out_slice] (see `dora_row_factors`)."""
        rank = a.shape[0]
        lo, hi = self.slice_offsets[slice_index], self.slice_offsets[slice_index + 1]
        self.clear_slice(slot, slice_index)
        self.a[slot, slice_index, :rank].copy_(a, non_blocking=True)
        self.b[slot, lo:hi, :rank].copy_(b, non_blocking=True)
        self.ranks[slot, slice_index] = rank
        self.scales[slot, slice_index] = scale
        self.ranks_host[slot][slice_index] = rank
        if row_factors is not None:
            self.row_factors[slot, lo:hi].copy_(row_factors, non_blocking=True)
            self.dora_host[slot][slice_index] = True

    def clear_slice(self, slot: int, slice_index: int) -> None:
        lo, hi = self.slice_offsets[slice_index], self.slice_offsets[slice_index + 1]
        self.a[slot, slice_index].zero_()
        self.b[slot, lo:hi].zero_()
        self.ranks[slot, slice_index] = 0
        self.scales[slot, slice_index] = 0.0
        self.ranks_host[slot][slice_index] = 0
        self.row_factors[slot, lo:hi] = 1.0
        self.dora_host[slot][slice_index] = False

    def write_sparse(self, slot: int, slice_index: int, csr: torch.Tensor | None) -> None:
        """Put one projection's sparse part S [out_slice, in] (a CSR tensor) into a slot (None: the slot has
        none there)."""
        self.sparse[slot][slice_index] = None if csr is None else csr.to(device=self.a.device, dtype=self.a.dtype)

    def any_sparse(self, slots: list[int]) -> bool:
        return any(part is not None for s in slots for part in self.sparse[s])

    def add_sparse(self, y: torch.Tensor, x: torch.Tensor, active_slots: list[int], seg_starts: list[int],
                   sorted_token_ids: torch.Tensor) -> None:
        """y[t] += x[t] @ S[slot(t)]ᵀ for every token of a slot with a sparse part, slice by slice: one
        sparse-dense product per (slot, slice), S never made dense.

        Semantics (the torch twin of a CSR kernel): for active slot a with tokens T_a =
        sorted_token_ids[seg_starts[a]:seg_starts[a + 1]], and each slice i with S = sparse[a][i]
        (rows lo_i..hi_i of the output): y[T_a, lo_i:hi_i] += (S @ x[T_a]ᵀ)ᵀ.
        """
        for a, slot in enumerate(active_slots):
            parts = self.sparse[slot]
            if all(part is None for part in parts):
                continue
            tokens = sorted_token_ids[seg_starts[a]:seg_starts[a + 1]].long()
            xs_t = x[tokens].T  # [in, n]
            for i, part in enumerate(parts):
                if part is not None:
                    lo, hi = self.slice_offsets[i], self.slice_offsets[i + 1]
                    y[tokens, lo:hi] += (part @ xs_t.to(part.dtype)).T.to(y.dtype)

    def any_dora(self, slots: list[int]) -> bool:
        return any(any(self.dora_host[s]) for s in slots)

    def max_rank_of(self, slots: list[int]) -> int:
        ranks = self.ranks_host
        return max((max(ranks[s]) for s in slots), default=0)


def dora_row_factors(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                     magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's per-output-row factor m / ||W + s·B·A||_row, as PEFT computes it (the norm over each row of
    the updated weight), without forming W + s·B·A: ||W_r + s (BA)_r||² = ||W_r||² + 2s (W Aᵀ)_r · B_r +
    s² B_r (A Aᵀ) B_rᵀ. weight: [out, in] (the base rows of this projection); a: [rank, in]; b: [out, rank];
    magnitude: [out]. Returns [out] fp32."""
    w, a, b = weight.float(), a.to(weight.device).float(), b.to(weight.device).float()
    cross = ((w @ a.T) * b).sum(dim=1)  # W_r · s(BA)_r / s
    update = ((b @ (a @ a.T)) * b).sum(dim=1)  # ||(BA)_r||²
    squared = w.square().sum(dim=1) + 2 * scale * cross + scale**2 * update
    return magnitude.to(weight.device).float() / squared.clamp(min=0).sqrt()
