"""Randomized schedules through the torch backend's decode mirror, checked step by step against the
paged oracle (and the oracle against a plain per-sequence softmax).

The paged-cache bookkeeping (free list, reference counts, block tables, slots, shared prefix blocks)
is modelled here on its own, independently of the engine's BlockManager. Keys and values are fresh
random numbers on every computation, so a row served from a stale copy never matches by chance."""

import math
import random

import pytest
import torch

from loraplex.kernels.backend import AttentionMetadata, TorchBackend
from loraplex.kernels.decode_cache import _SHRINK_AFTER
from loraplex.kernels.reference import paged_attention

HEAD_DIM = 8
TOL = {"atol": 1e-5, "rtol": 1e-5}


class _Seq:
    def __init__(self, num_layers: int, num_kv_heads: int) -> None:
        self.table: list[int] = []
        self.computed = 0  # tokens in the paged cache
        self.known = 0  # tokens known (the prompt, or the prompt and the outputs sampled so far)
        empty = torch.empty(0, num_kv_heads, HEAD_DIM)
        # What each layer's cache must hold for this sequence, position by position.
        self.keys = [empty] * num_layers
        self.values = [empty] * num_layers


class _Paged:
    """A paged KV cache and its bookkeeping, driving a backend one step at a time."""

    def __init__(self, g: torch.Generator, rng: random.Random, *, heads: int, kv_heads: int, block: int,
                 num_blocks: int, num_layers: int = 2) -> None:
        self.g, self.rng = g, rng
        self.heads, self.kv_heads, self.block, self.num_layers = heads, kv_heads, block, num_layers
        # One allocation for all layers, as the runner makes it; unwritten slots hold finite garbage.
        self.kv = torch.randn(2, num_layers, num_blocks, block, kv_heads, HEAD_DIM, generator=g)
        self.free = list(range(num_blocks))
        rng.shuffle(self.free)
        self.refs = [0] * num_blocks
        self.seqs: dict[str, _Seq] = {}
        # The decode rows of the last step that ran (for the bounds on what the mirror gathers).
        self.last_rows: dict[str, tuple[int, int]] = {}

    # -- bookkeeping ---------------------------------------------------------------------------

    def _alloc(self) -> int:
        block = self.free.pop(self.rng.randrange(len(self.free)))
        assert self.refs[block] == 0
        self.refs[block] = 1
        return block

    def add(self, seq_id: str, prompt_len: int, donor: str | None = None, shared_blocks: int = 0) -> None:
        """A new sequence; with a donor, its first `shared_blocks` full blocks come from the donor's
        (a prefix-cache hit): its context starts past them."""
        assert seq_id not in self.seqs
        seq = _Seq(self.num_layers, self.kv_heads)
        if donor is not None and shared_blocks:
            d = self.seqs[donor]
            n = shared_blocks * self.block
            assert n <= d.computed and n < prompt_len
            seq.table = d.table[:shared_blocks]
            for b in seq.table:
                self.refs[b] += 1
            seq.computed = n
            seq.keys = [k[:n].clone() for k in d.keys]
            seq.values = [v[:n].clone() for v in d.values]
        seq.known = prompt_len
        self.seqs[seq_id] = seq

    def release(self, seq_id: str) -> _Seq:
        """Finish or preempt: the sequence's blocks go back to the free list (shared ones once
        nobody holds them)."""
        seq = self.seqs.pop(seq_id)
        for b in seq.table:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.insert(self.rng.randrange(len(self.free) + 1), b)
        return seq

    def full_blocks(self, seq_id: str) -> int:
        return self.seqs[seq_id].computed // self.block

    # -- a step --------------------------------------------------------------------------------

    def step(self, backend: TorchBackend, scheduled: list[tuple[str, int]], label: str = "") -> None:
        """Run (sequence, new tokens) pairs through `backend` and check every layer's attention."""
        slots, seq_lens, starts = [], [], [0]
        for seq_id, num_new in scheduled:
            seq = self.seqs[seq_id]
            assert 1 <= num_new <= seq.known - seq.computed, (seq_id, num_new)
            for pos in range(seq.computed, seq.computed + num_new):
                if pos // self.block >= len(seq.table):
                    seq.table.append(self._alloc())
                slots.append(seq.table[pos // self.block] * self.block + pos % self.block)
            seq_lens.append(seq.computed + num_new)
            starts.append(starts[-1] + num_new)
        query_lens = [n for _, n in scheduled]
        width = max(len(self.seqs[s].table) for s, _ in scheduled) + self.rng.randrange(2)
        num_blocks = self.kv.shape[2]
        # Entries past a sequence's blocks may hold any block: random ones, not zeros.
        tables = [self.seqs[s].table + [self.rng.randrange(num_blocks) for _ in range(width - len(self.seqs[s].table))]
                  for s, _ in scheduled]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            max_query_len=max(query_lens),
            seq_ids=tuple(s for s, _ in scheduled),
            seq_lens_host=seq_lens,
            query_lens_host=query_lens,
        )
        shape_before = backend._decode._shape if backend._decode is not None else None
        backend.prepare(meta, self.block)
        self._check_gathered(backend, scheduled, seq_lens, label, shape_before)

        num_tokens, scale = starts[-1], 1 / math.sqrt(HEAD_DIM)
        for layer in range(self.num_layers):
            k_cache, v_cache = self.kv[0, layer], self.kv[1, layer]
            # q, k, v as the model passes them: strided views of one fused projection.
            qkv = torch.randn(num_tokens, self.heads + 2 * self.kv_heads, HEAD_DIM, generator=self.g)
            query, key, value = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
            backend.write_kv(key, value, k_cache, v_cache, meta)
            ours = backend.attention(query, key, value, k_cache, v_cache, meta, scale)
            expected = paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                       meta.query_start_loc, scale)
            torch.testing.assert_close(ours, expected, **TOL, msg=lambda m, layer=layer: f"{label} layer {layer}: {m}")
            for i, (seq_id, _) in enumerate(scheduled):
                seq, t = self.seqs[seq_id], slice(starts[i], starts[i + 1])
                seq.keys[layer] = torch.cat([seq.keys[layer], key[t]])
                seq.values[layer] = torch.cat([seq.values[layer], value[t]])
            torch.testing.assert_close(expected, self._plain(query, scheduled, starts, layer, scale), **TOL,
                                       msg=lambda m, layer=layer: f"{label} layer {layer} (oracle): {m}")
        for seq_id, num_new in scheduled:
            seq = self.seqs[seq_id]
            seq.computed += num_new
            if seq.computed == seq.known:  # its next token is sampled
                seq.known += 1

    def _plain(self, query, scheduled, starts, layer, scale) -> torch.Tensor:
        """Each sequence's queries over the keys it must have, with a plain softmax."""
        out = torch.empty_like(query)
        group = self.heads // self.kv_heads
        for i, (seq_id, num_new) in enumerate(scheduled):
            seq = self.seqs[seq_id]
            keys = seq.keys[layer].repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
            values = seq.values[layer].repeat_interleave(group, dim=1).transpose(0, 1)
            q = query[starts[i] : starts[i + 1]].transpose(0, 1)  # [H, q, D]
            length = keys.shape[1]
            q_pos = torch.arange(length - num_new, length).unsqueeze(1)
            scores = (q @ keys.transpose(1, 2)) * scale
            scores = scores.masked_fill(torch.arange(length) > q_pos, float("-inf"))
            out[starts[i] : starts[i + 1]] = (torch.softmax(scores, -1) @ values).transpose(0, 1)
        return out

    def _check_gathered(self, backend, scheduled, seq_lens, label, shape_before) -> None:
        """The mirror gathers no row that decoded in the step before and can stay or move up, unless
        its buffers shrank (the attention checks say whether what it keeps is right)."""
        mirror = backend._decode
        if mirror is None:
            return
        decodes = [(s, n) for (s, q), n in zip(scheduled, seq_lens, strict=True) if q == 1]
        kept = 0
        shrank = decodes and (mirror._shape[0] < shape_before[0] or mirror._shape[1] < shape_before[1])
        for row, (seq_id, n) in enumerate(decodes if not shrank else []):
            source, cached = self.last_rows.get(seq_id, (-1, -1))
            kept += cached == n - 1 and source >= row
        assert mirror.num_gathered <= len(decodes) - kept, f"{label}: gathered {mirror.num_gathered} of " \
            f"{len(decodes)} rows, {kept} of them kept from the step before"
        self.last_rows = {s: (row, n) for row, (s, n) in enumerate(decodes)}


# -- random schedules -----------------------------------------------------------------------------

MAX_LEN = 320  # a sequence finishes by this length


def _run_random(seed: int, heads: int, kv_heads: int, block: int, steps: int) -> dict[str, int]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    max_seqs = 7
    sim = _Paged(g, rng, heads=heads, kv_heads=kv_heads, block=block,
                 num_blocks=max_seqs * (-(-(MAX_LEN + 2) // block)) + 8)
    backend = TorchBackend()
    running: list[str] = []  # admission order
    waiting: list[tuple[str, int]] = []  # preempted: (id, tokens to recompute)
    finished: list[str] = []
    next_id = 0
    stats = dict.fromkeys(["steps", "empty", "prompt_only", "mixed", "decode_only", "preempted", "reused",
                           "shared", "reused_shared", "one_token_prompt", "chunked", "shuffled", "skipped"], 0)

    def decoding(s: str) -> bool:
        seq = sim.seqs[s]
        return seq.known - seq.computed == 1 and seq.computed > 0

    for step in range(steps):
        label = f"seed {seed} step {step}"
        if rng.random() < 0.04:  # a step with nothing scheduled: the backend sees no call at all
            stats["empty"] += 1
            continue
        # Finish some decoding sequences.
        for s in list(running):
            if decoding(s) and (rng.random() < 0.04 or sim.seqs[s].known >= MAX_LEN):
                running.remove(s)
                sim.release(s)
                finished.append(s)
        # Preempt one: its blocks are freed; it is recomputed from scratch later.
        if running and rng.random() < 0.07:
            s = running.pop(rng.randrange(len(running)))
            seq = sim.release(s)
            waiting.append((s, seq.known))
            stats["preempted"] += 1
        # Re-admit the preempted, then admit new arrivals.
        if waiting and len(running) < max_seqs and rng.random() < 0.4:
            s, known = waiting.pop(0)
            sim.add(s, known)
            running.append(s)
        while len(running) < max_seqs and rng.random() < 0.25:
            r = rng.random()
            prompt_len = 1 if r < 0.12 else rng.randint(80, 240) if r < 0.2 else rng.randint(2, 24)
            stats["one_token_prompt"] += prompt_len == 1
            if finished and rng.random() < 0.3:  # an id used before, by a sequence now finished
                s = finished.pop(-1 if rng.random() < 0.5 else rng.randrange(len(finished)))  # often the latest
                stats["reused"] += 1
            else:
                s, next_id = f"s{next_id}", next_id + 1
            donors = [d for d in running if sim.full_blocks(d) > 0]
            # A prefix-cache hit on a live sequence's full blocks: the first step has context.
            if donors and rng.random() < (0.7 if s in sim.last_rows else 0.3):
                donor = rng.choice(donors)
                choices = list(range(1, sim.full_blocks(donor) + 1))
                if s in sim.last_rows:
                    # Not a context of the finished sequence's last decode length under its id: the
                    # backend may take that for the same sequence (the engine never reuses the ids it
                    # passes, Sequence.serial; tests/engine covers a reused request id).
                    choices = [c for c in choices if c * block != sim.last_rows[s][1]]
                if choices:
                    shared = rng.choice(choices)
                    # Often exactly one token past the shared blocks: a first step of one token with context.
                    rest = 1 if rng.random() < 0.5 else rng.randint(1, 20)
                    sim.add(s, shared * block + rest, donor, shared)
                    stats["shared"] += 1
                    stats["reused_shared"] += s in sim.last_rows
                    running.append(s)
                    continue
            sim.add(s, prompt_len)
            running.append(s)
        if not running:
            stats["empty"] += 1
            continue
        if rng.random() < 0.1:  # the batch order changes for good
            rng.shuffle(running)
            stats["shuffled"] += 1
        order = list(running)
        if rng.random() < 0.05:  # and sometimes for this step only
            rng.shuffle(order)
        prompt_only = rng.random() < 0.08 and any(not decoding(s) for s in order)
        scheduled = []
        for s in order:
            if prompt_only and decoding(s):
                continue
            if rng.random() < 0.08:  # sits this step out, keeping its blocks
                stats["skipped"] += 1
                continue
            seq = sim.seqs[s]
            remaining = seq.known - seq.computed
            num_new = remaining if remaining == 1 or rng.random() < 0.5 else rng.randint(1, remaining)
            stats["chunked"] += num_new < remaining
            scheduled.append((s, num_new))
        if not scheduled:
            stats["empty"] += 1
            continue
        kinds = {q == 1 for _, q in scheduled}
        stats["prompt_only" if kinds == {False} else "decode_only" if kinds == {True} else "mixed"] += 1
        stats["steps"] += 1
        sim.step(backend, scheduled, label)
    return stats


@pytest.mark.parametrize("seed, heads, kv_heads, block", [
    (0, 4, 4, 4),  # MHA
    (1, 4, 2, 4),  # GQA 2
    (2, 8, 2, 2),  # GQA 4
    (3, 2, 2, 1),  # one-token blocks
    (4, 4, 1, 16),  # MQA, big blocks
    (5, 8, 4, 3),  # blocks of an odd size
])
def test_random_schedules_match_the_paged_oracle(seed, heads, kv_heads, block):
    stats = _run_random(seed, heads, kv_heads, block, steps=260)
    # The schedule covered what it is meant to.
    for kind in ("prompt_only", "mixed", "decode_only", "preempted", "reused", "shared", "one_token_prompt",
                 "chunked", "shuffled", "skipped", "empty"):
        assert stats[kind] > 0, (kind, stats)


# -- focused cases ---------------------------------------------------------------------------------

def _sim(seed: int, heads: int = 4, kv_heads: int = 2, block: int = 4, num_blocks: int = 256) -> _Paged:
    return _Paged(torch.Generator().manual_seed(seed), random.Random(seed), heads=heads, kv_heads=kv_heads,
                  block=block, num_blocks=num_blocks)


def _dec(*ids: str) -> list[tuple[str, int]]:
    return [(i, 1) for i in ids]


def test_reversed_batch_moves_up_what_it_can_and_gathers_rows_that_would_move_down():
    sim, backend = _sim(10), TorchBackend()
    for s, n in zip("abcd", (3, 5, 2, 7), strict=True):
        sim.add(s, n)
    sim.step(backend, [(s, sim.seqs[s].known) for s in "abcd"])
    sim.step(backend, _dec(*"abcd"))
    sim.step(backend, _dec(*"abcd"))
    sim.step(backend, _dec(*"dcba"), "reversed")  # d, c move up; b, a would move down
    assert backend._decode.num_gathered == 2
    sim.step(backend, _dec(*"dcba"))
    assert backend._decode.num_gathered == 0


def test_rows_and_length_grow_in_the_same_step_as_rows_move_up():
    sim, backend = _sim(11, num_blocks=512), TorchBackend()
    for s, n in zip("abc", (4, 6, 3), strict=True):
        sim.add(s, n)
    sim.step(backend, [(s, sim.seqs[s].known) for s in "abc"])
    sim.step(backend, _dec(*"abc"))
    # A long prompt finishes in the step where a leaves: c's row moves up, and the first decode of
    # the long sequence needs more length than the buffers have; e, f, g need more rows.
    sim.add("long", 200)
    sim.step(backend, [("a", 1), ("b", 1), ("c", 1), ("long", 199)])
    for s in "efg":
        sim.add(s, 1)
    rows, length = backend._decode._shape
    sim.release("a")
    sim.step(backend, [("b", 1), ("c", 1), ("long", 1), ("e", 1), ("f", 1), ("g", 1)], "grow")
    assert backend._decode._shape[0] > rows and backend._decode._shape[1] > length
    sim.step(backend, _dec("b", "c", "long", "e", "f", "g"))
    assert backend._decode.num_gathered == 0


def test_preempted_sequence_recomputed_from_scratch_is_not_served_its_old_row():
    sim, backend = _sim(12, block=2, num_blocks=64), TorchBackend()
    sim.add("x", 5)
    sim.add("y", 3)
    sim.step(backend, [("x", 5), ("y", 3)])
    sim.step(backend, _dec("x", "y"))
    # x is preempted; its freed blocks go to z, whose prompt overwrites them.
    old = sim.release("x")
    others = [b for b in sim.free if b not in old.table]
    sim.free = list(old.table) + others[:2]  # (and one for y)
    sim.add("z", 8)
    sim.step(backend, [("y", 1), ("z", 8)])
    assert not sim.free
    sim.free = others[2:]
    known = old.known
    # x comes back: recomputed (other keys than before) in two chunks, the last of one token.
    sim.add("x", known)
    sim.step(backend, [("x", known - 1), ("y", 1), ("z", 1)])
    sim.step(backend, [("x", 1), ("y", 1), ("z", 1)], "last chunk")
    sim.step(backend, _dec("x", "y", "z"), "decode")


def test_a_step_without_decodes_between_decode_steps():
    sim, backend = _sim(13), TorchBackend()
    for s, n in zip("abc", (3, 9, 4), strict=True):
        sim.add(s, n)
    sim.step(backend, [(s, sim.seqs[s].known) for s in "abc"])
    sim.step(backend, _dec(*"abc"))
    sim.add("p", 6)
    sim.step(backend, [("p", 6)], "prompt only")  # the decodes sit out: the mirror rests
    sim.step(backend, _dec("c", "a", "p", "b"), "after a rest")
    sim.step(backend, _dec("c", "a", "p", "b"))
    assert backend._decode.num_gathered == 0


@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (4, 2), (8, 2)])
def test_mixed_step_of_decodes_one_token_prompts_and_chunks_with_context(heads, kv_heads):
    sim, backend = _sim(14, heads=heads, kv_heads=kv_heads, block=4), TorchBackend()
    sim.add("a", 5)
    sim.add("b", 11)
    sim.step(backend, [("a", 5), ("b", 4)])  # b's first chunk: fresh
    sim.add("one", 1)  # a one-token prompt rides with the decodes
    sim.add("shared", 9, donor="a", shared_blocks=1)  # a prefix hit: a chunk with context
    sim.step(backend, [("b", 3), ("a", 1), ("one", 1), ("shared", 5)], "mixed")
    sim.step(backend, [("one", 1), ("b", 4), ("a", 1), ("shared", 1)], "mixed, reordered")
    sim.step(backend, _dec("one", "b", "a", "shared"))


def test_reused_id_after_a_prefix_hit_of_another_length_is_gathered():
    sim, backend = _sim(16), TorchBackend()
    sim.add("x", 7)
    sim.add("y", 9)
    sim.step(backend, [("x", 7), ("y", 9)])
    sim.step(backend, _dec("y", "x"))  # x: row 1, 8 tokens cached
    sim.release("x")  # x finishes; the id comes back with a 5-token prompt, 4 of them a hit on y's block
    sim.add("x", 5, donor="y", shared_blocks=1)
    sim.step(backend, _dec("y", "x"), "reused id")
    assert backend._decode.num_gathered == 1


def test_buffers_follow_the_decodes_not_the_largest_batch_and_longest_context_ever():
    sim, backend = _sim(17, num_blocks=2048), TorchBackend()
    # Many short decodes, then one long one: sized for the long one alone.
    short = [f"s{i}" for i in range(32)]
    for s in short:
        sim.add(s, 3)
    sim.step(backend, [(s, 3) for s in short])
    sim.step(backend, _dec(*short))
    for s in short:
        sim.release(s)
    sim.add("long", 400)
    sim.step(backend, [("long", 400)])
    sim.step(backend, _dec("long"), "one long decode")
    rows, length = backend._decode._shape
    assert rows * length <= 2 * 401, (rows, length)
    # Many long decodes and a short one; when the long ones finish, the buffers stay for
    # _SHRINK_AFTER steps (a straggler, or the next batch, reuses them), then shrink to the short one.
    sim.release("long")
    long = [f"l{i}" for i in range(16)]
    for s in long:
        sim.add(s, 300)
    sim.add("short", 2)
    sim.step(backend, [*((s, 300) for s in long), ("short", 2)])
    sim.step(backend, _dec(*long, "short"))
    large = backend._decode._shape
    assert large[0] * large[1] >= 16 * 301
    for s in long:
        sim.release(s)
    for step in range(_SHRINK_AFTER):
        sim.step(backend, _dec("short"), f"the short one alone, step {step}")
        assert backend._decode._shape == large, step
    sim.step(backend, _dec("short"), "the short one alone, shrinking")
    rows, length = backend._decode._shape
    assert rows * length <= 4 * 1 * (4 + _SHRINK_AFTER + 64), (rows, length)
