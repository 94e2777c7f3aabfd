"""BlockManager: free list, reference counts, block tables and the prefix cache.

Sequences are hand-made (no model): a test plays the engine's part by advancing
`num_computed_tokens`, committing, and appending output tokens, as `LLMEngine.step` does.
"""

from __future__ import annotations

import random

import pytest

from loraplex.engine.block_manager import BlockManager
from loraplex.engine.sampling import SamplingParams
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence, SequenceStatus


def make_seq(request_id: str, tokens: list[int], max_tokens: int = 4, salt: str | None = None) -> Sequence:
    seq = Sequence(
        request_id, list(tokens), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        stop_token_ids=frozenset(), generator=None,
    )
    seq.adapter_key = salt
    return seq


def compute(bm: BlockManager, seq: Sequence, num_new: int | None = None) -> None:
    """Allocate, 'run' and commit the next `num_new` tokens (default: all uncomputed) of `seq`."""
    if num_new is None:
        num_new = seq.num_tokens - seq.num_computed_tokens
    bm.append_slots(seq, num_new)
    seq.num_computed_tokens += num_new
    bm.commit(seq)


def check_invariants(bm: BlockManager, holders: list[Sequence]) -> None:
    """Every block is either free (ref 0, on the free list) or held exactly ref_count times."""
    held: dict[int, int] = {}
    for seq in holders:
        assert len(set(seq.block_table)) == len(seq.block_table), f"{seq} holds a block twice"
        for block_id in seq.block_table:
            held[block_id] = held.get(block_id, 0) + 1
    for block in bm.blocks:
        assert block.ref_count == held.get(block.block_id, 0), f"block {block.block_id}: bad ref count"
        assert (block.block_id in bm.free_ids) == (block.ref_count == 0), f"block {block.block_id}"
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].content_hash == h
    assert bm.num_free_blocks == bm.num_blocks - len(held)


# -- allocation, ref counts, free list -------------------------------------------------------


def test_append_slots_allocates_ceil_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq("a", list(range(10)))
    assert bm.blocks_needed(seq, 10) == 3
    bm.append_slots(seq, 10)
    assert len(seq.block_table) == 3
    assert len(set(seq.block_table)) == 3
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    assert bm.num_free_blocks == 5
    check_invariants(bm, [seq])

    bm.free(seq)
    assert seq.block_table == []
    assert bm.num_free_blocks == bm.num_blocks == 8
    assert all(b.ref_count == 0 for b in bm.blocks)
    check_invariants(bm, [])


def test_append_slots_adds_a_block_only_when_the_last_one_is_full():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq("a", list(range(6)))
    compute(bm, seq)  # 6 tokens: 2 blocks
    assert len(seq.block_table) == 2
    seq.token_ids.append(100)  # 7th token still fits the second block
    assert bm.blocks_needed(seq, 1) == 0
    compute(bm, seq, 1)
    seq.token_ids.append(101)  # 8th fits too
    compute(bm, seq, 1)
    assert len(seq.block_table) == 2
    seq.token_ids.append(102)  # 9th needs a third block
    assert bm.blocks_needed(seq, 1) == 1
    compute(bm, seq, 1)
    assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 5
    check_invariants(bm, [seq])


def test_slot_maps_positions_into_the_block_table():
    bm = BlockManager(num_blocks=8, block_size=4)
    filler = make_seq("filler", [1, 2, 3])
    bm.append_slots(filler, 3)  # so that `seq` gets blocks other than 0, 1, 2
    seq = make_seq("a", list(range(10)))
    bm.append_slots(seq, 10)
    for pos in range(10):
        assert bm.slot(seq, pos) == seq.block_table[pos // 4] * 4 + pos % 4
    slots = [bm.slot(seq, p) for p in range(10)]
    assert len(set(slots)) == 10
    assert not set(slots) & {bm.slot(filler, p) for p in range(3)}


def test_slots_of_a_range_match_slot_of_each_position():
    bm = BlockManager(num_blocks=16, block_size=4)
    seq = make_seq("a", list(range(14)))
    seq.block_table = [9, 3, 12, 0]  # out of order, as after frees and reuse
    for start in range(14):
        for end in range(start + 1, 15):
            assert bm.slots(seq, start, end) == [bm.slot(seq, p) for p in range(start, end)], (start, end)


def test_append_slots_without_room_raises_and_allocates_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq("a", list(range(9)))  # needs 3 blocks
    assert not bm.can_append(seq, 9)
    with pytest.raises(RuntimeError, match="can_append"):
        bm.append_slots(seq, 9)
    assert seq.block_table == []
    assert bm.num_free_blocks == 2
    check_invariants(bm, [])


def test_can_append_counts_free_blocks_exactly():
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = make_seq("a", list(range(12)))
    assert bm.can_append(seq, 12)  # exactly 3 blocks
    seq.token_ids.append(1)
    assert not bm.can_append(seq, 13)


# -- prefix cache ----------------------------------------------------------------------------


def test_second_sequence_reuses_the_leading_full_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    a = make_seq("a", prompt)
    compute(bm, a)
    b = make_seq("b", prompt[:8] + [7, 7, 7])
    assert bm.reuse_cached_prefix(b) == 8
    assert b.num_computed_tokens == 8
    assert b.num_cached_tokens == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2]
    assert bm.blocks[a.block_table[2]].ref_count == 1  # the partial block is never shared
    # b computes only its own tail, in a block of its own
    compute(bm, b)
    assert b.block_table[2] not in a.block_table
    check_invariants(bm, [a, b])

    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == bm.num_blocks
    check_invariants(bm, [])


def test_cached_blocks_outlive_their_sequence_until_reused():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(9))
    a = make_seq("a", prompt)
    compute(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 16
    b = make_seq("b", prompt)
    assert bm.reuse_cached_prefix(b) == 8
    assert b.block_table == a_blocks[:2]
    # taken back off the free list
    assert bm.num_free_blocks == 14
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1]
    check_invariants(bm, [b])


def test_last_token_is_never_taken_from_the_cache():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(8))  # exactly 2 full blocks
    a = make_seq("a", prompt + [50])
    compute(bm, a)  # both blocks of `prompt` are cached
    same = make_seq("same", prompt)
    # 8 tokens all cached, but one must be computed to give logits: only the first block is reused
    assert bm.reuse_cached_prefix(same) == 4
    assert same.num_tokens - same.num_computed_tokens >= 1
    one_block = make_seq("one", prompt[:4])
    assert bm.reuse_cached_prefix(one_block) == 0
    assert one_block.block_table == []


def test_a_different_adapter_key_does_not_share():
    bm = BlockManager(num_blocks=32, block_size=4)
    prompt = list(range(9))
    plain = make_seq("plain", prompt)
    compute(bm, plain)
    assert bm.reuse_cached_prefix(make_seq("salted", prompt, salt="tenant-1")) == 0

    salted = make_seq("salted2", prompt, salt="tenant-1")
    compute(bm, salted)
    same_salt = make_seq("same_salt", prompt, salt="tenant-1")
    assert bm.reuse_cached_prefix(same_salt) == 8
    assert same_salt.block_table == salted.block_table[:2]
    assert bm.reuse_cached_prefix(make_seq("other_salt", prompt, salt="tenant-2")) == 0
    unsalted = make_seq("unsalted", prompt)
    assert bm.reuse_cached_prefix(unsalted) == 8
    assert unsalted.block_table == plain.block_table[:2]


def test_a_block_is_reused_only_under_an_identical_prefix():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(bm, a)
    # same second block, different first block: the hash chain must not match
    b = make_seq("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.reuse_cached_prefix(b) == 0
    # same first block, different second block: only the first is reused
    c = make_seq("c", [1, 2, 3, 4, 5, 6, 7, 0, 9])
    assert bm.reuse_cached_prefix(c) == 4


def test_a_matching_block_after_a_different_parent_is_not_reused():
    bm = BlockManager(num_blocks=16, block_size=4)
    p, q, r, s = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]
    compute(bm, make_seq("pq", p + q + [0]))
    compute(bm, make_seq("rs", r + s + [0]))
    # p is cached as a first block and s as a second block, but s only after r: its keys and values
    # were computed in r's context, so after p it must be computed again
    z = make_seq("ps", p + s + [0])
    assert bm.reuse_cached_prefix(z) == 4


def test_prefix_caching_disabled_shares_nothing():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    a = make_seq("a", list(range(9)))
    compute(bm, a)
    assert bm.cached == {}
    b = make_seq("b", list(range(9)))
    assert bm.reuse_cached_prefix(b) == 0
    assert b.block_table == []


def test_only_full_computed_blocks_are_cached():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq("a", list(range(12)))
    compute(bm, a, 6)  # a chunk: one full block computed, the second half-way
    assert len(bm.cached) == 1
    assert bm.blocks[a.block_table[0]].content_hash is not None
    assert bm.blocks[a.block_table[1]].content_hash is None
    assert bm.reuse_cached_prefix(make_seq("b", list(range(12)))) == 4
    compute(bm, a, 6)
    assert len(bm.cached) == 3


def test_reallocating_a_cached_free_block_evicts_its_hash():
    bm = BlockManager(num_blocks=3, block_size=4)
    prompt = list(range(20, 29))
    a = make_seq("a", prompt[:8])
    compute(bm, a)  # blocks 0 and 1 cached
    first, second = a.block_table
    bm.free(a)
    assert len(bm.cached) == 2

    c = make_seq("c", [9] * 4)
    compute(bm, c)  # takes the never-used block first: nothing evicted yet
    assert c.block_table[0] not in (first, second)
    assert len(bm.cached) == 3  # a's two blocks and c's own

    # The next allocation must take one of a's cached blocks: it is evicted. A sequence's tail
    # block goes first (it is freed first), so the chain's head survives.
    d = make_seq("d", [8] * 4)
    bm.append_slots(d, 4)
    assert d.block_table == [second]
    assert bm.blocks[second].content_hash is None
    assert all(block_id != second for block_id in bm.cached.values())
    b = make_seq("b", prompt)
    assert bm.reuse_cached_prefix(b) == 4  # the evicted block is no longer found
    assert b.block_table == [first]
    check_invariants(bm, [c, d, b])


def test_an_evicted_hash_is_gone_even_when_all_blocks_are_reallocated():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = make_seq("a", list(range(8)))
    compute(bm, a)
    bm.free(a)
    assert len(bm.cached) == 2
    c = make_seq("c", [5] * 8)
    bm.append_slots(c, 8)  # both cached blocks reallocated, nothing computed yet
    assert bm.cached == {}
    assert all(block.content_hash is None for block in bm.blocks)
    assert bm.reuse_cached_prefix(make_seq("b", list(range(9)))) == 0


def test_identical_blocks_computed_twice_are_cached_once():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq("a", list(range(9)))
    b = make_seq("b", list(range(9)))
    compute(bm, a)
    bm.append_slots(b, 9)  # b allocated its own blocks (no reuse): same content in other blocks
    b.num_computed_tokens = 9
    bm.commit(b)
    assert len(bm.cached) == 2
    assert set(bm.cached.values()) == set(a.block_table[:2])
    check_invariants(bm, [a, b])
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 16
    check_invariants(bm, [])


# -- no leak over whole lifecycles (finish, abort, preemption) through the scheduler ---------


def run_step(sched: Scheduler) -> list[Sequence]:
    """One engine step without a model, as LLMEngine.step does it; returns the finished sequences."""
    out = sched.schedule()
    for seq, num_new in out.scheduled:
        seq.num_computed_tokens += num_new
        sched.block_manager.commit(seq)
    finished = []
    for seq, _ in out.scheduled:
        if seq.num_computed_tokens == seq.num_tokens:  # sampled
            seq.token_ids.append(1000 + len(seq.output_token_ids))
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                seq.finish("length")
                sched.finish(seq)
                finished.append(seq)
    return finished


def test_free_list_is_full_again_after_sequences_finish():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [make_seq(f"s{i}", list(range(i, i + 5 + 3 * i)), max_tokens=3 + i) for i in range(5)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(100):
        if not sched.has_unfinished():
            break
        run_step(sched)
        check_invariants(bm, sched.running)
    assert all(seq.is_finished and len(seq.output_token_ids) == seq.params.max_tokens for seq in seqs)
    assert bm.num_free_blocks == bm.num_blocks
    check_invariants(bm, [])


def test_free_list_is_full_again_after_aborts():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    shared = list(range(50, 62))
    seqs = [make_seq(f"s{i}", shared + [i] * 3, max_tokens=50) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    run_step(sched)
    run_step(sched)
    assert [s.request_id for s in sched.running] == ["s0", "s1"]
    assert bm.num_free_blocks < bm.num_blocks
    # abort a running one, a waiting one, then the rest
    for request_id in ("s1", "s3", "s0", "s2"):
        aborted = sched.abort(request_id)
        assert aborted is not None and aborted.finish_reason == "abort" and aborted.block_table == []
        check_invariants(bm, sched.running)
        if sched.has_unfinished():
            run_step(sched)
            check_invariants(bm, sched.running)
    assert not sched.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    check_invariants(bm, [])


def test_free_list_is_full_again_after_preemptions():
    bm = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=32)
    seqs = [make_seq(f"s{i}", [i] * 4, max_tokens=8) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(200):
        if not sched.has_unfinished():
            break
        run_step(sched)
        check_invariants(bm, sched.running)
        assert all(seq.block_table == [] for seq in sched.waiting)
    assert sched.num_preemptions > 0, "the test must exercise preemption"
    assert all(seq.is_finished for seq in seqs)
    assert all(seq.output_token_ids == [1000 + i for i in range(8)] for seq in seqs)
    assert bm.num_free_blocks == bm.num_blocks
    check_invariants(bm, [])


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_with_aborts_and_preemption_leaks_nothing(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=12, block_size=4)
    sched = Scheduler(bm, max_num_seqs=5, max_num_batched_tokens=16)
    prefixes = [[rng.randrange(1, 500) for _ in range(8)] for _ in range(3)]
    seqs = []
    for i in range(30):
        tokens = rng.choice(prefixes)[: rng.randrange(0, 9)] + [rng.randrange(1, 500)
                                                                for _ in range(rng.randrange(1, 14))]
        seqs.append(make_seq(f"r{i}", tokens, max_tokens=rng.randrange(1, 12)))
    pending = list(seqs)
    for _ in range(2000):
        if not pending and not sched.has_unfinished():
            break
        for _ in range(rng.randrange(0, 3)):
            if pending:
                sched.add(pending.pop(0))
        if rng.random() < 0.1:
            live = list(sched.running) + list(sched.waiting)
            if live:
                assert sched.abort(rng.choice(live).request_id) is not None
        run_step(sched)
        assert len(sched.running) <= 5
        check_invariants(bm, sched.running)
    assert not sched.has_unfinished() and not pending
    assert all(seq.is_finished for seq in seqs)
    for seq in seqs:
        if seq.finish_reason == "length":
            assert len(seq.output_token_ids) == seq.params.max_tokens
    assert all(seq.status is SequenceStatus.FINISHED for seq in seqs)
    assert bm.num_free_blocks == bm.num_blocks
    check_invariants(bm, [])


def test_fresh_blocks_are_reported_once_and_cached_ones_never():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.padding_block == 8  # one past the managed blocks: never given out
    first = make_seq("a", list(range(1, 10)))
    compute(bm, first)
    assert sorted(bm.take_fresh()) == sorted(first.block_table) and bm.take_fresh() == []
    bm.free(first)
    again = make_seq("b", list(range(1, 10)))  # same prompt: its two full blocks come from the cache
    bm.reuse_cached_prefix(again)
    compute(bm, again)
    assert bm.take_fresh() == again.block_table[2:]
    assert all(block_id < bm.padding_block for block_id in again.block_table)


def test_uncache_forgets_only_the_blocks_no_one_else_holds():
    bm = BlockManager(num_blocks=8, block_size=4)
    shared = make_seq("a", list(range(1, 10)))
    compute(bm, shared)
    other = make_seq("b", list(range(1, 9)) + [99, 98, 97, 96, 95])
    bm.reuse_cached_prefix(other)  # shares blocks 0 and 1 (tokens 1-8) with `shared`
    compute(bm, other)
    assert other.block_table[:2] == shared.block_table[:2]
    own_full = other.block_table[2]  # tokens 99..96: full, committed, held by `other` alone
    assert bm.blocks[own_full].content_hash is not None
    bm.uncache(other)
    assert all(bm.blocks[b].content_hash is not None for b in other.block_table[:2])  # `shared` holds them
    assert bm.blocks[own_full].content_hash is None and own_full not in bm.cached.values()
