"""LoRAMetaBuffers: the engine's per-step LoRA layout, built on the host into buffers allocated once,
against LoRAKernelMeta.make (which sorts a token-slot tensor on its device)."""

from __future__ import annotations

import random

import pytest
import torch

from loraplex.kernels.lora_meta import LoRAKernelMeta, LoRAMetaBuffers

CPU = torch.device("cpu")


def _tokens(run_slots: list[int], run_lengths: list[int]) -> torch.Tensor:
    return torch.tensor([s for s, n in zip(run_slots, run_lengths, strict=True) for _ in range(n)], dtype=torch.int32)


def _assert_same(built: LoRAKernelMeta, expected: LoRAKernelMeta) -> None:
    for name in ("token_slots", "sorted_token_ids", "active_slots", "seg_starts"):
        assert torch.equal(getattr(built, name), getattr(expected, name)), name
    assert built.max_seg_len == expected.max_seg_len


@pytest.mark.parametrize("seed", range(8))
def test_layout_matches_sorting_the_token_slots(seed):
    rng = random.Random(seed)
    max_loras, max_tokens = 6, 300
    buffers = LoRAMetaBuffers(max_tokens, max_loras, CPU)
    for _ in range(5):  # one set of buffers across steps of different shapes
        num_runs = rng.randint(1, 12)
        run_slots = [rng.choice([-1, *range(max_loras)]) for _ in range(num_runs)]
        run_lengths = [rng.choice([1, 1, 2, rng.randint(1, 25)]) for _ in range(num_runs)]
        run_slots[rng.randrange(num_runs)] = rng.randrange(max_loras)  # at least one adapter
        layout = buffers.layout(run_slots, run_lengths)
        assert layout is not None
        meta, active, seg_starts = layout
        expected = LoRAKernelMeta.make(_tokens(run_slots, run_lengths))
        _assert_same(meta, expected)
        assert active == expected.active_slots.tolist() and seg_starts == expected.seg_starts.tolist()


def test_buffers_keep_their_storage_across_steps():
    buffers = LoRAMetaBuffers(16, 4, CPU)
    first, _, _ = buffers.layout([0, 1], [3, 1])
    second, _, _ = buffers.layout([2, -1, 2, 3], [1, 5, 1, 1])
    for name in ("token_slots", "sorted_token_ids", "active_slots", "seg_starts"):
        assert getattr(first, name).data_ptr() == getattr(second, name).data_ptr(), name
    _assert_same(second, LoRAKernelMeta.make(_tokens([2, -1, 2, 3], [1, 5, 1, 1])))


def test_no_adapter_in_the_step_is_none_and_too_many_tokens_is_refused():
    buffers = LoRAMetaBuffers(8, 2, CPU)
    assert buffers.layout([-1, -1], [4, 4]) is None
    with pytest.raises(ValueError, match="9 tokens"):
        buffers.layout([0], [9])


@pytest.mark.gpu
def test_a_step_that_samples_nothing_does_not_overwrite_the_previous_layout_in_flight():
    """On CUDA the host side is pinned and copied asynchronously: a second layout written while the
    GPU is still busy (no sampled token read back in between) must not change what the first one
    copies."""
    cuda = torch.device("cuda")
    buffers = LoRAMetaBuffers(64, 4, cuda)
    torch.cuda._sleep(200_000_000)  # keep the stream busy, so the first copy is still queued
    first, _, _ = buffers.layout([1, 0], [40, 3])
    first = {name: getattr(first, name).clone() for name in ("token_slots", "sorted_token_ids", "seg_starts")}
    buffers.layout([2], [5])
    expected = LoRAKernelMeta.make(_tokens([1, 0], [40, 3]).to(cuda))
    for name, value in first.items():
        assert torch.equal(value, getattr(expected, name)), name
