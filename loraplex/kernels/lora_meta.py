"""Per-step layout of tokens by adapter slot, shared by every LoRA layer of the step."""

from __future__ import annotations

import itertools
from array import array
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
        """From a token-slot tensor, on its device (reads sizes back from it: for tests and tools; the
        engine builds its meta through `LoRAMetaBuffers`)."""
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


class LoRAMetaBuffers:
    """The step's `LoRAKernelMeta`, laid out on the host from each run of tokens (a sequence's new
    tokens share one adapter slot) and copied into buffers allocated once.

    Nothing is read back from the device (no `.tolist()`, no `int(tensor)`), and the device buffers
    keep their addresses from step to step (the views into them change length with the step). On
    CUDA the host side is pinned and one asynchronous copy moves it; before the next step writes the
    host side again it waits for that copy's event, which has almost always passed already (a step
    that samples reads its tokens back), but not after a step that sampled nothing, such as a chunk
    of a long prompt.
    """

    def __init__(self, max_tokens: int, max_loras: int, device: torch.device) -> None:
        self.max_tokens = max_tokens
        self.max_loras = max_loras
        # [token_slots | sorted_token_ids | active_slots | seg_starts] at fixed offsets
        size = 2 * max_tokens + 2 * max_loras + 1
        pin = device.type == "cuda"
        self._host = torch.zeros(size, dtype=torch.int32, pin_memory=pin)
        self._device = torch.zeros(size, dtype=torch.int32, device=device) if pin else self._host
        self._copied = torch.cuda.Event() if pin else None

    def layout(self, run_slots: list[int],
               run_lengths: list[int]) -> tuple[LoRAKernelMeta, list[int], list[int]] | None:
        """(meta, active slots, segment starts) on the host; None when no run has an adapter (slot -1)."""
        order = sorted(range(len(run_slots)), key=run_slots.__getitem__)  # stable: batch order within a slot
        run_starts = list(itertools.accumulate(run_lengths, initial=0))
        num_tokens = run_starts[-1]
        if num_tokens > self.max_tokens:
            raise ValueError(f"{num_tokens} tokens in one step; the buffers hold {self.max_tokens}")
        token_slots = array("i")
        for slot, n in zip(run_slots, run_lengths, strict=True):
            token_slots.extend(itertools.repeat(slot, n))
        sorted_ids = array("i")
        active: list[int] = []
        seg_starts: list[int] = []
        for run in order:
            slot = run_slots[run]
            if slot >= 0 and (not active or active[-1] != slot):
                active.append(slot)
                seg_starts.append(len(sorted_ids))
            sorted_ids.extend(range(run_starts[run], run_starts[run + 1]))
        if not active:
            return None
        seg_starts.append(num_tokens)
        max_seg_len = max(b - a for a, b in itertools.pairwise(seg_starts))
        return self._fill(token_slots, sorted_ids, active, seg_starts, max_seg_len), active, seg_starts

    def _fill(self, token_slots: array, sorted_ids: array, active: list[int], seg_starts: list[int],
              max_seg_len: int) -> LoRAKernelMeta:
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the host side
        n, m, a = len(token_slots), self.max_tokens, len(active)
        seg_offset = 2 * m + self.max_loras
        spans = ((0, token_slots), (m, sorted_ids), (2 * m, array("i", active)), (seg_offset, array("i", seg_starts)))
        for offset, values in spans:
            self._host[offset:offset + len(values)] = torch.frombuffer(values, dtype=torch.int32)
        if self._device is not self._host:
            self._device.copy_(self._host, non_blocking=True)
            self._copied.record(torch.cuda.current_stream(self._device.device))
        d = self._device
        return LoRAKernelMeta(
            token_slots=d[:n],
            sorted_token_ids=d[m:m + n],
            active_slots=d[2 * m:2 * m + a],
            seg_starts=d[seg_offset:seg_offset + a + 1],
            max_seg_len=max_seg_len,
        )
