"""The torch backend's decode mirror (and its use of a prompt's own keys) gives the same attention as
reading everything from the paged cache."""

import math

import torch

from loraplex.kernels.backend import AttentionMetadata, TorchBackend
from loraplex.kernels.reference import paged_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK, NUM_BLOCKS = 4, 2, 8, 4, 256


class _Sequences:
    """Paged-cache bookkeeping for a few sequences, as the block manager would do it."""

    def __init__(self, g: torch.Generator) -> None:
        self.g = g
        self.k_cache = torch.randn(NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
        self.v_cache = torch.randn(NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
        self.free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def step(self, backend: TorchBackend, scheduled: list[tuple[str, int]]):
        """Run one step of (sequence, new tokens) through the backend; returns (ours, reference)."""
        slots, seq_lens, starts = [], [], [0]
        for seq_id, num_new in scheduled:
            table = self.tables.setdefault(seq_id, [])
            start = self.lens.get(seq_id, 0)
            for pos in range(start, start + num_new):
                if pos // BLOCK >= len(table):
                    table.append(self.free.pop())
                slots.append(table[pos // BLOCK] * BLOCK + pos % BLOCK)
            self.lens[seq_id] = start + num_new
            seq_lens.append(start + num_new)
            starts.append(starts[-1] + num_new)
        width = max(len(self.tables[s]) for s, _ in scheduled)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor([self.tables[s] + [0] * (width - len(self.tables[s])) for s, _ in scheduled],
                                      dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            max_query_len=max(n for _, n in scheduled),
            seq_ids=tuple(s for s, _ in scheduled), seq_lens_host=seq_lens,
            query_lens_host=[n for _, n in scheduled],
        )
        backend.prepare(meta, BLOCK)
        num_tokens = starts[-1]
        key = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=self.g)
        value = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=self.g)
        query = torch.randn(num_tokens, HEADS, HEAD_DIM, generator=self.g)
        backend.write_kv(key, value, self.k_cache, self.v_cache, meta)
        scale = 1 / math.sqrt(HEAD_DIM)
        ours = backend.attention(query, key, value, self.k_cache, self.v_cache, meta, scale)
        expected = paged_attention(query, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens,
                                   meta.query_start_loc, scale)
        return ours, expected


def _decodes(*ids: str) -> list[tuple[str, int]]:
    return [(i, 1) for i in ids]


def test_mirror_appends_moves_and_gathers_only_the_rows_that_need_it():
    seqs = _Sequences(torch.Generator().manual_seed(0))
    backend = TorchBackend()
    # (step, rows the mirror must gather from the paged cache)
    schedule = [
        ([("a", 6), ("b", 9), ("c", 3)], 0),  # prompts only: no decode, nothing mirrored
        (_decodes("a", "b", "c"), 3),  # first decodes: every row gathered
        (_decodes("a", "b", "c"), 0),  # appended in place
        (_decodes("a", "c"), 0),  # b left: c's row moves up
        (_decodes("a", "c"), 0),
        (_decodes("a", "c", "b"), 1),  # b is back: only its row is gathered
        ([("a", 1), ("d", 5), ("c", 1), ("b", 1)], 0),  # a mixed step: decodes mirrored, d's prompt its own keys
        (_decodes("a", "d", "c", "b"), 3),  # d now decodes in row 1, pushing c and b down: gathered
        ([("a", 1), ("d", 1), ("e", 4), ("c", 1)], 0),  # e's prompt arrives in a chunk
        ([("a", 1), ("d", 1), ("c", 1), ("e", 3)], 0),  # its second chunk attends to the cached first
        (_decodes("a", "d", "c", "e"), 1),
    ]
    for step, (scheduled, gathered) in enumerate(schedule):
        ours, expected = seqs.step(backend, scheduled)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        assert backend._decode.num_gathered == gathered, f"step {step}"


def test_mirror_grows_past_its_headroom_and_batch_keeping_its_rows():
    seqs = _Sequences(torch.Generator().manual_seed(1))
    backend = TorchBackend()
    seqs.step(backend, [("a", 3), ("b", 2)])
    ids = ["a", "b"]
    for step in range(90):  # past the 64 steps of room reserved at the first decode
        scheduled = _decodes(*ids)
        if step in (10, 11, 12):  # the batch grows by one sequence at a time
            scheduled.append((f"n{step}", 2))
        ours, expected = seqs.step(backend, scheduled)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        # Only a sequence decoding for the first time is gathered.
        assert backend._decode.num_gathered == {0: 2, 11: 1, 12: 1, 13: 1}.get(step, 0), f"step {step}"
        ids += [seq_id for seq_id, n in scheduled if n > 1]


def test_next_batch_reuses_the_buffers_a_straggler_leaves_behind():
    seqs = _Sequences(torch.Generator().manual_seed(3))
    backend = TorchBackend()
    batch = [f"a{i}" for i in range(8)]
    seqs.step(backend, [(s, 5) for s in batch])
    for _ in range(3):
        seqs.step(backend, _decodes(*batch))
    buffers = [t for kv in backend._decode._buffers.values() for t in kv]

    def same_buffers() -> bool:
        now = [t for kv in backend._decode._buffers.values() for t in kv]
        return len(now) == len(buffers) and all(a is b for a, b in zip(now, buffers, strict=True))

    # The batch ends with one straggler, the engine idles, then a batch of the same shape arrives.
    for _ in range(2):
        seqs.step(backend, _decodes(batch[-1]))
        assert same_buffers()  # not shrunk for the straggler
    seqs.step(backend, [(f"b{i}", 5) for i in range(8)])
    for _ in range(3):
        ours, expected = seqs.step(backend, _decodes(*(f"b{i}" for i in range(8))))
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert same_buffers()  # the same tensors: no reallocation


def test_prompts_of_different_lengths_attend_causally_to_their_own_keys():
    seqs = _Sequences(torch.Generator().manual_seed(2))
    backend = TorchBackend(decode_mirror=False)
    ours, expected = seqs.step(backend, [("a", 7), ("b", 2), ("c", 5)])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert backend._decode is None
