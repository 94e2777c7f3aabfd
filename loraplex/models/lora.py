"""Adapter slots inside the model: every adaptable linear layer holds the stacked LoRA weights of
`max_loras` slots, and adds the adapters' outputs of a batch in one pass."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.models.sparse_parts import SparseSlotParts
from loraplex.models.sparse_pool import SparsePool


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
    sparse: SparseSlotParts | None  # the slots' sparse parts (S per slice), applied after the LoRA term; None:
    # the engine serves no sparse adapters (--max-sparse-memory 0)
    _dora_slots: set[int] = field(default_factory=set)

    @classmethod
    def allocate(cls, max_loras: int, max_rank: int, in_features: int, output_sizes: list[int],
                 dtype: torch.dtype, device: torch.device, pool: SparsePool | None = None) -> LoRASlotWeights:
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
            sparse=None if pool is None else SparseSlotParts(pool, max_loras, offsets, in_features),
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
            self._dora_slots.add(slot)

    def clear_slice(self, slot: int, slice_index: int) -> None:
        lo, hi = self.slice_offsets[slice_index], self.slice_offsets[slice_index + 1]
        self.a[slot, slice_index].zero_()
        self.b[slot, lo:hi].zero_()
        self.ranks[slot, slice_index] = 0
        self.scales[slot, slice_index] = 0.0
        self.ranks_host[slot][slice_index] = 0
        self.row_factors[slot, lo:hi] = 1.0
        self.dora_host[slot][slice_index] = False
        if not any(self.dora_host[slot]):
            self._dora_slots.discard(slot)

    def any_dora(self, slots: list[int]) -> bool:
        return bool(self.dora_slots) and not self.dora_slots.isdisjoint(slots)

    @property
    def dora_slots(self) -> set[int]:
        """Slots with a DoRA factor in some slice (kept in step with dora_host)."""
        return self._dora_slots

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
