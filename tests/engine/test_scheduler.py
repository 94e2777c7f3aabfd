"""Scheduler: FIFO admission, the token budget with chunked prefill, preemption of the newest, abort.

No model: `run_step` plays LLMEngine.step (advance num_computed_tokens by what was scheduled, commit
the blocks, append a token to every sequence whose known tokens are all computed, finish at max_tokens).
"""

from __future__ import annotations

from loraplex.engine.block_manager import BlockManager
from loraplex.engine.sampling import SamplingParams
from loraplex.engine.scheduler import Scheduler, SchedulerOutput
from loraplex.engine.sequence import Sequence, SequenceStatus


def make_seq(request_id: str, num_prompt: int, max_tokens: int = 4, first: int = 0) -> Sequence:
    tokens = [first + i for i in range(num_prompt)]
    return Sequence(
        request_id, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        stop_token_ids=frozenset(), generator=None,
    )


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=256,
                   prefix_caching=True) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)


def run_step(sched: Scheduler) -> SchedulerOutput:
    out = sched.schedule()
    bm = sched.block_manager
    for seq, num_new in out.scheduled:
        # the scheduler must have given every scheduled token a slot
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens + num_new
        assert num_new >= 1
        seq.num_computed_tokens += num_new
        assert seq.num_computed_tokens <= seq.num_tokens
        bm.commit(seq)
    for seq, _ in out.scheduled:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(1000 + len(seq.output_token_ids))
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                seq.finish("length")
                sched.finish(seq)
    return out


def ids(seqs) -> list[str]:
    return [seq.request_id for seq in seqs]


def scheduled(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(seq.request_id, n) for seq, n in out.scheduled]


# -- admission -------------------------------------------------------------------------------


def test_admission_is_fifo_within_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(f"s{i}", 3, max_tokens=2 + i, first=10 * i) for i in range(5)]
    for seq in seqs:
        sched.add(seq)
    out = run_step(sched)
    assert scheduled(out) == [("s0", 3), ("s1", 3)]
    assert ids(sched.running) == ["s0", "s1"]
    assert ids(sched.waiting) == ["s2", "s3", "s4"]
    assert all(seq.status is SequenceStatus.WAITING for seq in sched.waiting)

    out = run_step(sched)  # s0 samples its 2nd token and finishes
    assert scheduled(out) == [("s0", 1), ("s1", 1)]
    assert seqs[0].is_finished
    assert ids(sched.running) == ["s1"]

    out = run_step(sched)  # the freed seat goes to the oldest waiting request
    assert scheduled(out) == [("s1", 1), ("s2", 3)]
    assert ids(sched.waiting) == ["s3", "s4"]


def test_empty_scheduler_schedules_nothing():
    sched = make_scheduler()
    out = sched.schedule()
    assert out.is_empty and out.num_batched_tokens == 0 and not sched.has_unfinished()


def test_everything_finishes_with_exactly_max_tokens():
    sched = make_scheduler(max_num_seqs=3, max_num_batched_tokens=10)
    seqs = [make_seq(f"s{i}", 2 + 5 * i, max_tokens=1 + i, first=100 * i) for i in range(6)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(200):
        if not sched.has_unfinished():
            break
        run_step(sched)
    assert all(seq.is_finished for seq in seqs)
    assert [len(seq.output_token_ids) for seq in seqs] == [1 + i for i in range(6)]
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


# -- token budget and chunked prefill -------------------------------------------------------


def test_long_prompt_is_split_across_steps_within_the_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    seq = make_seq("long", 20, max_tokens=2)
    sched.add(seq)
    chunks = []
    for _ in range(3):
        out = run_step(sched)
        assert out.num_batched_tokens <= 8
        chunks.append(scheduled(out))
    assert chunks == [[("long", 8)], [("long", 8)], [("long", 4)]]
    # a token is sampled only once the whole prompt is computed
    assert seq.num_computed_tokens == 20 and seq.output_token_ids == [1000]
    assert scheduled(run_step(sched)) == [("long", 1)]
    assert seq.is_finished


def test_running_decodes_go_first_and_the_new_prompt_gets_the_rest():
    sched = make_scheduler(max_num_batched_tokens=8)
    a = make_seq("a", 3, max_tokens=10)
    b = make_seq("b", 3, max_tokens=10, first=50)
    sched.add(a)
    sched.add(b)
    assert scheduled(run_step(sched)) == [("a", 3), ("b", 3)]
    long = make_seq("long", 20, max_tokens=1, first=200)
    sched.add(long)
    history = [scheduled(run_step(sched)) for _ in range(4)]
    assert history == [
        [("a", 1), ("b", 1), ("long", 6)],
        [("a", 1), ("b", 1), ("long", 6)],
        [("a", 1), ("b", 1), ("long", 6)],
        [("a", 1), ("b", 1), ("long", 2)],
    ]
    assert long.is_finished


def test_budget_limits_how_many_waiting_prompts_join():
    sched = make_scheduler(max_num_batched_tokens=10)
    for i in range(3):
        sched.add(make_seq(f"s{i}", 4, first=10 * i))
    out = run_step(sched)
    # s0 (4) + s1 (4) + 2 tokens of s2: s2 starts its prefill in the same step
    assert scheduled(out) == [("s0", 4), ("s1", 4), ("s2", 2)]
    assert out.num_batched_tokens == 10
    out = run_step(sched)
    assert scheduled(out) == [("s0", 1), ("s1", 1), ("s2", 2)]


def test_budget_never_exceeded_and_seat_limit_held_under_load():
    sched = make_scheduler(num_blocks=40, max_num_seqs=3, max_num_batched_tokens=7)
    seqs = [make_seq(f"s{i}", 1 + (7 * i) % 19, max_tokens=1 + i % 5, first=31 * i) for i in range(12)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(500):
        if not sched.has_unfinished():
            break
        out = run_step(sched)
        assert 0 < out.num_batched_tokens <= 7
        assert len(sched.running) <= 3
        assert len({id(s) for s, _ in out.scheduled}) == len(out.scheduled)
    assert all(seq.is_finished for seq in seqs)


# -- preemption ------------------------------------------------------------------------------


def three_full_blocks() -> tuple[Scheduler, list[Sequence]]:
    """4 blocks of 4 tokens; three 4-token prompts fill three. Their first decode needs a block each."""
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=8, prefix_caching=False)
    seqs = [make_seq(name, 4, max_tokens=3, first=10 * i) for i, name in enumerate("abc")]
    for seq in seqs:
        sched.add(seq)
    assert scheduled(run_step(sched)) == [("a", 4), ("b", 4), ("c", 4)]
    assert sched.block_manager.num_free_blocks == 1
    return sched, seqs


def test_the_newest_running_sequence_is_preempted_first():
    sched, (a, b, c) = three_full_blocks()
    late = make_seq("late", 2, first=90)
    sched.add(late)
    out = run_step(sched)
    # a takes the free block; b needs one too: c (the newest) gives its block up
    assert ids(out.preempted) == ["c"]
    assert scheduled(out) == [("a", 1), ("b", 1)]
    assert c.status is SequenceStatus.WAITING
    assert c.num_computed_tokens == 0
    assert c.block_table == []
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    # its sampled token is kept: it will be recomputed from prompt + output
    assert c.token_ids == [20, 21, 22, 23, 1000]
    # back at the front of the queue, ahead of a later arrival; nobody new joined this step
    assert ids(sched.waiting) == ["c", "late"]
    assert ids(sched.running) == ["a", "b"]


def test_a_preempted_sequence_is_readmitted_before_later_arrivals():
    sched, (a, b, c) = three_full_blocks()
    late = make_seq("late", 2, first=90)
    sched.add(late)
    run_step(sched)  # c preempted
    out = run_step(sched)  # a and b sample their last token; no block frees up during the step
    assert scheduled(out) == [("a", 1), ("b", 1)]
    assert a.is_finished and b.is_finished
    assert ids(sched.waiting) == ["c", "late"]
    out = run_step(sched)
    # c first, recomputing its 4 prompt tokens and its 1 output token; then the later arrival
    assert scheduled(out) == [("c", 5), ("late", 2)]
    assert ids(sched.running) == ["c", "late"]
    for _ in range(20):
        if not sched.has_unfinished():
            break
        run_step(sched)
    assert c.output_token_ids == [1000, 1001, 1002]
    assert late.is_finished
    assert sched.block_manager.num_free_blocks == 4


def test_a_later_arrival_does_not_jump_a_preempted_sequence_that_does_not_fit_yet():
    sched = make_scheduler(num_blocks=5, block_size=4, prefix_caching=False)
    a, b, c = (make_seq(name, 4, max_tokens=4, first=10 * i) for i, name in enumerate("abc"))
    for seq in (a, b, c):
        sched.add(seq)
    run_step(sched)  # three blocks used, two free
    late = make_seq("late", 2, first=90)
    sched.add(late)
    out = run_step(sched)
    # a and b take the two free blocks; c, the newest, has to give its own up
    assert ids(out.preempted) == ["c"] and scheduled(out) == [("a", 1), ("b", 1)]
    assert ids(sched.waiting) == ["c", "late"]
    out = run_step(sched)
    # one block is free: enough for `late` (2 tokens) but not for c (5 tokens); c is first in
    # line, so nobody is admitted
    assert sched.block_manager.num_free_blocks == 1
    assert scheduled(out) == [("a", 1), ("b", 1)]
    assert ids(sched.waiting) == ["c", "late"]


def test_readmitted_sequence_recomputes_all_its_tokens():
    sched, (a, b, c) = three_full_blocks()
    run_step(sched)  # c preempted with 5 tokens
    readmission = None
    for _ in range(20):
        out = run_step(sched)
        for seq, n in out.scheduled:
            if seq is c:
                readmission = n
                break
        if readmission is not None:
            break
    assert readmission == 5  # 4 prompt tokens + its 1 output token, all recomputed


def test_several_preemptions_in_one_step_keep_their_order_in_the_queue():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=8, prefix_caching=False)
    a = make_seq("a", 4, max_tokens=20)
    b = make_seq("b", 4, max_tokens=3, first=10)
    c = make_seq("c", 4, max_tokens=3, first=20)
    d = make_seq("d", 4, max_tokens=3, first=30)
    for seq in (a, b, c, d):
        sched.add(seq)
    run_step(sched)  # all four prompts: every block in use
    assert sched.block_manager.num_free_blocks == 0
    out = run_step(sched)
    # a needs a block: d then c go; a gets d's, b gets c's
    assert ids(out.preempted) == ["d", "c"]
    assert ids(sched.waiting) == ["c", "d"]  # the older one first
    assert scheduled(out) == [("a", 1), ("b", 1)]


def test_a_step_that_preempts_admits_nobody():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=6, prefix_caching=False)
    a = make_seq("a", 4, max_tokens=10)
    c = make_seq("c", 12, max_tokens=2, first=50)
    sched.add(a)
    sched.add(c)
    assert scheduled(run_step(sched)) == [("a", 4), ("c", 2)]
    assert scheduled(run_step(sched)) == [("a", 1), ("c", 5)]
    assert sched.block_manager.num_free_blocks == 0
    out = run_step(sched)
    # c needs a third block for its next chunk: it is the newest, so it preempts itself. Its two
    # freed blocks would hold a 5-token chunk of it again, but nobody joins in a preempting step.
    assert ids(out.preempted) == ["c"]
    assert scheduled(out) == [("a", 1)]
    assert ids(sched.waiting) == ["c"] and sched.block_manager.num_free_blocks == 2
    assert scheduled(run_step(sched)) == [("a", 1), ("c", 5)]


def test_the_oldest_keeps_running_when_blocks_run_out():
    sched = make_scheduler(num_blocks=2, block_size=4, prefix_caching=False)
    a = make_seq("a", 4, max_tokens=10)
    b = make_seq("b", 3, max_tokens=10, first=10)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: 1 block (4 tokens), b: 1 block (3 tokens)
    out = run_step(sched)
    # a needs a 2nd block: b goes; b then waits
    assert ids(out.preempted) == ["b"]
    assert scheduled(out) == [("a", 1)]
    assert sched.block_manager.num_free_blocks == 0


def test_a_preempted_sequence_finds_its_own_blocks_in_the_prefix_cache():
    sched = make_scheduler(num_blocks=4, block_size=4)
    a = make_seq("a", 4, max_tokens=8)
    v = make_seq("v", 9, max_tokens=2, first=40)  # two full prompt blocks, cached once computed
    sched.add(a)
    sched.add(v)
    run_step(sched)  # every block in use
    out = run_step(sched)
    assert ids(out.preempted) == ["v"]
    assert v.num_cached_tokens == 0  # nothing was cached when it first came in
    readmitted = None
    for _ in range(30):
        out = run_step(sched)
        readmitted = next((n for seq, n in out.scheduled if seq is v), None)
        if readmitted is not None:
            break
    assert a.is_finished
    # some of its full blocks survived in the cache: fewer than all its 10 tokens are recomputed
    assert v.num_computed_tokens == 10
    reused = v.num_computed_tokens - readmitted
    assert reused > 0 and reused % 4 == 0
    assert v.num_cached_tokens == 0  # counts the first admission only
    for _ in range(10):
        if not sched.has_unfinished():
            break
        run_step(sched)
    assert v.output_token_ids == [1000, 1001]
    assert sched.block_manager.num_free_blocks == 4


# -- abort -----------------------------------------------------------------------------------


def test_abort_running_and_waiting_sequences_frees_their_blocks():
    sched = make_scheduler(num_blocks=16, max_num_seqs=2)
    seqs = [make_seq(f"s{i}", 6, max_tokens=10, first=10 * i) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    run_step(sched)
    bm = sched.block_manager
    assert bm.num_free_blocks == 16 - 4

    running = sched.abort("s0")
    assert running is seqs[0]
    assert running.is_finished and running.finish_reason == "abort"
    assert running.block_table == [] and "s0" not in ids(sched.running)
    assert bm.num_free_blocks == 16 - 2

    waiting = sched.abort("s3")
    assert waiting is seqs[3] and waiting.finish_reason == "abort"
    assert ids(sched.waiting) == ["s2"]

    assert sched.abort("s3") is None
    assert sched.abort("nope") is None

    run_step(sched)  # s2 takes s0's seat
    assert ids(sched.running) == ["s1", "s2"]
    assert sched.abort("s1") is not None and sched.abort("s2") is not None
    assert not sched.has_unfinished()
    assert bm.num_free_blocks == 16


def test_abort_of_a_preempted_sequence():
    sched, (a, b, c) = three_full_blocks()
    run_step(sched)
    assert c.status is SequenceStatus.WAITING
    assert sched.abort("c") is c and c.finish_reason == "abort"
    for _ in range(20):
        if not sched.has_unfinished():
            break
        run_step(sched)
    assert a.is_finished and b.is_finished
    assert sched.block_manager.num_free_blocks == 4


# -- prefix cache through the scheduler -----------------------------------------------------


def test_a_later_identical_prompt_is_served_from_the_prefix_cache():
    sched = make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=64)
    a = make_seq("a", 10, max_tokens=4)
    sched.add(a)
    run_step(sched)
    b = make_seq("b", 10, max_tokens=4)
    sched.add(b)
    out = run_step(sched)
    # b's first 8 prompt tokens are in a's blocks: only 2 are computed
    assert scheduled(out) == [("a", 1), ("b", 2)]
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]


def test_cached_prefix_is_given_back_when_the_head_cannot_be_admitted():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=16)
    a = make_seq("a", 9, max_tokens=3)
    sched.add(a)
    run_step(sched)  # a: 10 tokens in 3 blocks, its first two cached
    bm = sched.block_manager
    assert bm.num_free_blocks == 1
    b = make_seq("b", 16, max_tokens=1)  # shares a's first 9 tokens
    assert b.token_ids[:9] == a.token_ids[:9]
    sched.add(b)
    out = run_step(sched)
    # b would reuse 8 tokens but needs 2 more blocks for its other 8: it waits, holding nothing
    assert scheduled(out) == [("a", 1)]
    assert b.status is SequenceStatus.WAITING and ids(sched.waiting) == ["b"]
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert all(bm.blocks[i].ref_count == 1 for i in a.block_table)
    assert bm.num_free_blocks == 1
    run_step(sched)  # a finishes; its blocks stay cached
    assert a.is_finished and bm.num_free_blocks == 4
    out = run_step(sched)
    assert scheduled(out) == [("b", 8)]
    assert b.num_cached_tokens == 8
