"""Paged KV-cache bookkeeping: a free list, reference counts, per-sequence block tables, and a
prefix cache that lets sequences with the same leading tokens share full blocks."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from loraplex.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "content_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.content_hash: bytes | None = None  # set once the block is full and computed


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with no user, least recently freed first; they keep their hash until reused.
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # content hash -> block id
        self._seq_hashes: dict[str, list[bytes]] = {}  # request id -> hashes of its committed blocks
        # Blocks handed out fresh (not through the prefix cache) since the last `take_fresh`: their
        # old contents must be cleared before a step reads them (see `take_fresh`).
        self._fresh: list[int] = []

    @property
    def padding_block(self) -> int:
        """The block id that pads block tables: one past the managed blocks, never given out, so the
        model runner keeps it zero and no padded read sees another sequence's keys or values."""
        return len(self.blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(total - len(seq.block_table), 0)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def reuse_cached_prefix(self, seq: Sequence) -> int:
        """Attach the cached blocks that hold this new sequence's leading tokens; returns how many
        tokens they cover. At least one token is left to compute, to give the logits to sample from."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        hashes: list[bytes] = []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        if seq.params.prompt_logprobs is not None:  # positions still to give prompt logprobs are computed
            max_blocks = min(max_blocks, len(seq.prompt_logprobs) // self.block_size)
        for i in range(max_blocks):
            h = self._hash(hashes[-1] if hashes else b"", seq, i)
            block_id = self.cached.get(h)
            if block_id is None:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            hashes.append(h)
        self._seq_hashes[seq.request_id] = hashes
        seq.num_computed_tokens = len(hashes) * self.block_size
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
        return seq.num_computed_tokens

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` the blocks for its next `num_new_tokens` tokens. Check `can_append` first."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"{needed} blocks needed, {self.num_free_blocks} free: call can_append first")
        for _ in range(needed):
            block_id = next(iter(self.free_ids))
            block = self.blocks[block_id]
            if block.content_hash is not None:  # evict its cached content
                del self.cached[block.content_hash]
                block.content_hash = None
            self._take(block_id)
            seq.block_table.append(block_id)
            self._fresh.append(block_id)

    def take_fresh(self) -> list[int]:
        """The blocks handed out fresh since the last call. Their positions past a sequence's length
        still enter attention with weight zero, and 0 x NaN is NaN: whatever an earlier owner left
        there (a poisoned adapter's NaN, say) must be cleared before they are read."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def uncache(self, seq: Sequence) -> None:
        """Forget the prefix-cache entries of the blocks only `seq` holds (its KV is not to be reused,
        e.g. it turned non-finite)."""
        for block_id in seq.block_table:
            block = self.blocks[block_id]
            if block.ref_count == 1 and block.content_hash is not None:
                del self.cached[block.content_hash]
                block.content_hash = None
        self._seq_hashes.pop(seq.request_id, None)

    def commit(self, seq: Sequence) -> None:
        """Register the blocks `seq` has filled and computed, so later sequences can reuse them."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.request_id, [])
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(len(hashes), num_full):
            h = self._hash(hashes[-1] if hashes else b"", seq, i)
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.content_hash is None and h not in self.cached:
                block.content_hash = h
                self.cached[h] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq` (finished, aborted or preempted)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[block_id] = None
        seq.block_table = []
        self._seq_hashes.pop(seq.request_id, None)

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """The cache slots of positions start..end-1, a block's run at a time."""
        size, table = self.block_size, seq.block_table
        out: list[int] = []
        position = start
        while position < end:
            block_end = min((position // size + 1) * size, end)
            base = table[position // size] * size - (position // size) * size
            out.extend(range(base + position, base + block_end))
            position = block_end
        return out

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1

    def _hash(self, parent: bytes, seq: Sequence, index: int) -> bytes:
        # The hash chains over all earlier blocks: a block is reused only under an identical prefix.
        tokens = seq.token_ids[index * self.block_size : (index + 1) * self.block_size]
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array("q", tokens).tobytes())
        if seq.adapter_key:
            digest.update(seq.adapter_key.encode())
        return digest.digest()
