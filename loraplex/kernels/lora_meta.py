"""Per-step layout of tokens by adapter slot, shared by every LoRA layer of the step."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAKernelMeta:
    """Tokens grouped by adapter slot, in any batch order.

    token_slots:      [num_tokens] int32, -1 = no adapter
    sorted_token_ids: [num_tokens] int32, token indices stably sorted by slot; tokens without an
                      adapter come first and belong to no segment
    active_slots:     [num_active] int32, the distinct slots >= 0 in the batch, ascending
    seg_starts:       [num_active + 1] int32, segment a is sorted_token_ids[seg_starts[a]:seg_starts[a+1]]
    max_seg_len:      the longest segment (host int, sizes the launch grid)
    """

    token_slots: torch.Tensor
    sorted_token_ids: torch.Tensor
    active_slots: torch.Tensor
    seg_starts: torch.Tensor
    max_seg_len: int

    @property
    def num_active(self) -> int:
        return self.active_slots.shape[0]

    @classmethod
    def make(cls, token_slots: torch.Tensor) -> LoRAKernelMeta:
        token_slots = token_slots.to(torch.int32)
        order = torch.sort(token_slots, stable=True).indices
        slots, counts = torch.unique_consecutive(token_slots[order], return_counts=True)
        has_adapter = slots >= 0
        num_without = int(counts[~has_adapter].sum())
        counts = counts[has_adapter]
        seg_starts = torch.zeros(counts.shape[0] + 1, dtype=torch.int32, device=token_slots.device)
        seg_starts[1:] = torch.cumsum(counts, 0) + num_without
        seg_starts[0] = num_without
        return cls(
            token_slots=token_slots,
            sorted_token_ids=order.to(torch.int32),
            active_slots=slots[has_adapter].to(torch.int32),
            seg_starts=seg_starts,
            max_seg_len=int(counts.max()) if counts.numel() else 0,
        )
