"""Continuous batching: which sequences run this step, and with how many tokens each.

Running sequences go first, oldest first, one decode token each or the next chunk of their prompt;
waiting ones join while the token budget, the sequence limit and the free KV blocks allow. Out of
blocks, the newest running sequence is preempted: its blocks are freed and it is recomputed later
from its tokens (prompt + output so far), first in line. Nothing is dropped.

Adapters: a waiting sequence whose adapter is still loading from disk is passed over (its load
runs in the background) without holding back those behind it. One whose adapter needs a slot
while every slot serves running sequences waits too; once it has been passed over MAX_SKIPS
times, nobody behind it is admitted until it is, so the slots drain and it cannot starve.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from loraplex.engine.adapters import AdapterManager
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.sequence import Sequence, SequenceStatus

MAX_SKIPS = 64


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # their adapter could not be loaded

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.failed


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 adapters: AdapterManager | None = None) -> None:
        self.block_manager = block_manager
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission: the last is the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._release(seq)
                    seq.finish("abort")
                    return seq
        return None

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence the engine has finished and free its blocks."""
        self.running.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq.lora_slot >= 0:
            self.adapters.release(seq.adapter_key)
            seq.lora_slot = -1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:  # a step that had to preempt admits nobody new
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            needed = self.block_manager.blocks_needed(seq, num_new)  # preempting others does not change it
            while needed > self.block_manager.num_free_blocks:
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it preempted itself: every newer sequence is out already
            if needed:  # most decode steps fit in the last block
                self.block_manager.append_slots(seq, num_new)
            out.scheduled.append((seq, num_new))
            budget -= num_new
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        if self.adapters is not None:
            self.adapters.want([seq.adapter_key for seq in self.waiting if seq.adapter_key is not None])
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                return
            failure = self._adapter_failure(seq)
            if failure is not None:
                self.waiting.remove(seq)
                seq.finish("error", failure)
                out.failed.append(seq)
                continue
            admissible = self._adapter_admissible(seq)
            if admissible is None:
                return  # starving for a slot: strict order until it gets one
            if not admissible:
                continue
            self.block_manager.reuse_cached_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.can_append(seq, num_new):
                self.block_manager.free(seq)  # give back the cached prefix it borrowed
                seq.num_computed_tokens = 0
                return
            if seq.adapter_key is not None:
                seq.lora_slot = self.adapters.acquire(seq.adapter_key)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.block_manager.append_slots(seq, num_new)
            out.scheduled.append((seq, num_new))
            budget -= num_new

    def _adapter_failure(self, seq: Sequence) -> str | None:
        """Why this waiting sequence can never run on its adapter, or None."""
        key = seq.adapter_key
        if key is None:
            return None
        # An adapter removed or replaced after this request was accepted still serves it: the
        # registration's files stay until no request uses them.
        return self.adapters.errors.get(key)

    def _adapter_admissible(self, seq: Sequence) -> bool | None:
        """True: its adapter (if any) can take a slot now. False: pass it over this round. None: it
        has been passed over too often for want of a slot; admit nobody behind it."""
        if seq.adapter_key is None:
            return True
        if not self.adapters.ready(seq.adapter_key):
            return False  # loading from disk in the background
        if self.adapters.can_place(seq.adapter_key):
            return True
        seq.num_skips += 1
        return None if seq.num_skips > MAX_SKIPS else False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.penalty_state = None  # device memory held by running sequences only; rebuilt from token_ids
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
