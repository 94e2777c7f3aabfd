"""The CPU LoRA path (TorchBackend.add_lora) against the reference twins."""

import pytest
import torch

from loraplex.kernels import reference
from loraplex.kernels.backend import LoRABatch, TorchBackend
from loraplex.kernels.lora_meta import LoRAMetaBuffers
from loraplex.models.lora import LoRASlotWeights

IN_FEATURES = 40
OUTPUT_SIZES = [24, 8, 8]


def _slot_weights(max_loras: int, ranks: list[list[int]], max_rank: int = 16) -> LoRASlotWeights:
    g = torch.Generator().manual_seed(0)
    w = LoRASlotWeights.allocate(max_loras, max_rank, IN_FEATURES, OUTPUT_SIZES, torch.float32, torch.device("cpu"))
    for slot, slot_ranks in enumerate(ranks):
        for i, r in enumerate(slot_ranks):
            if r:
                out = w.slice_offsets[i + 1] - w.slice_offsets[i]
                w.write(slot, i, torch.randn(r, IN_FEATURES, generator=g), torch.randn(out, r, generator=g),
                        0.25 * (slot + 1))
    return w


MIXES = {
    "decode-distinct": [0, 1, 2, 3, 4, 5],
    "one-adapter-long": [2] * 40,
    "skewed-long-and-short": [1] * 30 + [0, 3, -1, 4, 4, 5] + [1] * 5,
    "some-base": [-1, 3, -1, 3, 0],
    "non-consecutive-slots": [5, 1, 5, 3, 1],
    "prefill-chunks": [0] * 20 + [5] * 17 + [3] * 3,
}


def assert_matches_reference(w: LoRASlotWeights, run_slots: list[int], run_lengths: list[int], seed: int) -> None:
    """TorchBackend.add_lora over these runs of tokens (a sequence's new tokens share one slot) equals
    the reference shrink then expand."""
    token_slots = torch.tensor([s for s, n in zip(run_slots, run_lengths, strict=True) for _ in range(n)],
                               dtype=torch.int32)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(token_slots), IN_FEATURES, generator=g)
    expected = torch.randn(len(token_slots), sum(OUTPUT_SIZES), generator=g)
    actual = expected.clone()
    h = reference.lora_shrink(x, w.a, w.ranks, token_slots)
    reference.lora_expand(expected, h, w.b, w.ranks, w.scales, token_slots, w.slice_offsets)
    backend = TorchBackend()
    batch = LoRABatch.make(LoRAMetaBuffers(len(token_slots), w.a.shape[0], torch.device("cpu")), run_slots,
                           run_lengths)
    backend.prepare_lora(batch)
    backend.add_lora(actual, x, w, batch)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mix", MIXES.values(), ids=MIXES.keys())
def test_matches_reference(mix):
    ranks = [[16, 4, 0], [1, 1, 1], [8, 0, 8], [0, 0, 0], [16, 16, 16], [2, 0, 0]]
    assert_matches_reference(_slot_weights(6, ranks), mix, [1] * len(mix), seed=1)


def test_batch_without_adapters_is_none():
    assert LoRABatch.make(LoRAMetaBuffers(4, 2, torch.device("cpu")), [-1, -1], [3, 1]) is None


def test_cleared_slice_contributes_nothing():
    w = _slot_weights(2, [[4, 4, 4], [4, 4, 4]])
    w.clear_slice(0, 1)
    x = torch.randn(2, IN_FEATURES)
    y = torch.zeros(2, sum(OUTPUT_SIZES))
    batch = LoRABatch.make(LoRAMetaBuffers(2, 2, torch.device("cpu")), [0], [2])
    backend = TorchBackend()
    backend.prepare_lora(batch)
    backend.add_lora(y, x, w, batch)
    lo, hi = w.slice_offsets[1], w.slice_offsets[2]
    assert torch.all(y[:, lo:hi] == 0)
    assert torch.any(y[:, :lo] != 0) and torch.any(y[:, hi:] != 0)


def test_runs_of_several_tokens_and_a_slot_in_runs_apart_match_reference():
    """As the engine builds batches: each sequence's new tokens are one run; slot 1 has two runs apart."""
    ranks = [[16, 4, 0], [8, 8, 8], [2, 0, 2]]
    assert_matches_reference(_slot_weights(3, ranks), [1, 0, 1, -1, 2, 1], [5, 3, 20, 4, 1, 1], seed=2)
