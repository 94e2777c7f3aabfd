"""The torch backend's decode mirror gives the same attention as gathering from the paged cache."""

import math

import torch

from loraplex.kernels.backend import AttentionMetadata, TorchBackend
from loraplex.kernels.reference import paged_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK, NUM_BLOCKS = 4, 2, 8, 4, 64


def _decode_step(backend, k_cache, v_cache, tables, lens, ids, g):
    """Write one new key/value per sequence through the backend and attend; returns (ours, reference)."""
    slots = torch.tensor([tables[b][(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for b, n in enumerate(lens)])
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=slots, block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=torch.arange(len(lens) + 1, dtype=torch.int32), max_query_len=1,
        seq_ids=tuple(ids), seq_lens_host=list(lens),
    )
    backend.prepare(meta, BLOCK)
    key = torch.randn(len(lens), KV_HEADS, HEAD_DIM, generator=g)
    value = torch.randn(len(lens), KV_HEADS, HEAD_DIM, generator=g)
    query = torch.randn(len(lens), HEADS, HEAD_DIM, generator=g)
    backend.write_kv(key, value, k_cache, v_cache, meta)
    scale = 1 / math.sqrt(HEAD_DIM)
    ours = backend.attention(query, k_cache, v_cache, meta, scale)
    expected = paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale)
    return ours, expected


def test_mirror_matches_the_paged_cache_through_appends_and_batch_changes():
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    v_cache = torch.randn(NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    tables = {"a": [free.pop() for _ in range(2)], "b": [free.pop() for _ in range(3)], "c": [free.pop()]}
    lens = {"a": 6, "b": 9, "c": 3}
    backend = TorchBackend()
    schedule = [("a", "b", "c")] * 4 + [("a", "c")] * 3 + [("a", "c", "b")] * 2  # b leaves, then rejoins
    for step, ids in enumerate(schedule):
        for i in ids:
            lens[i] += 1
            if lens[i] > len(tables[i]) * BLOCK:
                tables[i].append(free.pop())
        ours, expected = _decode_step(backend, k_cache, v_cache, [tables[i] for i in ids], [lens[i] for i in ids],
                                      ids, g)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        if step in (1, 2, 3, 5, 6, 8):  # same batch as the step before: served by appending
            assert backend._decode.appending, f"step {step} should append to the mirror"
        if step in (0, 4, 7):  # a new batch: gathered again
            assert not backend._decode.appending
