"""The kernel backend: chosen once from the device, so model code never branches on it."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from loraplex.errors import invalid
from loraplex.kernels import torch_attention
from loraplex.kernels.decode_cache import DecodeKVCache
from loraplex.kernels.lora_meta import LoRAKernelMeta, LoRAMetaBuffers


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the paged KV cache; built once per step by the runner."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: block * block_size + offset
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int
    # Which sequence each row is, unique for the sequence's whole life and never given to another
    # (lets backends keep state per sequence across steps).
    seq_ids: tuple[Hashable, ...]
    seq_lens_host: list[int]  # seq_lens, on the host
    query_lens_host: list[int]  # new tokens per sequence, on the host
    dtype: torch.dtype = torch.float32  # the model's (SDPA adds masks in the query's dtype): masks are built in it
    plan: object = field(default=None)  # backend-specific layout, filled by `Backend.prepare`


class LoRAWeights(Protocol):
    """What `add_lora` reads of a layer's adapter slots (see models/lora.py)."""

    a: torch.Tensor  # [max_loras, num_slices, max_rank, in_features]
    b: torch.Tensor  # [max_loras, out_features, max_rank]
    ranks: torch.Tensor  # [max_loras, num_slices] int32
    scales: torch.Tensor  # [max_loras, num_slices] fp32
    slice_offsets: list[int]

    def max_rank_of(self, slots: list[int]) -> int: ...


@dataclass
class LoRABatch:
    """This step's tokens grouped by adapter slot; built once per step by the runner."""

    meta: LoRAKernelMeta
    active_slots: list[int]  # meta.active_slots on the host
    seg_starts: list[int]  # meta.seg_starts on the host
    plan: object = field(default=None)  # backend-specific, filled by `Backend.prepare_lora`
    _token_index: torch.Tensor | None = field(default=None, repr=False)

    @property
    def token_index(self) -> torch.Tensor:
        """meta.token_slots as int64 (-1: no adapter), for indexing per-slot tables; made once per step."""
        if self._token_index is None:
            self._token_index = self.meta.token_slots.long()
        return self._token_index

    @classmethod
    def make(cls, buffers: LoRAMetaBuffers, run_slots: list[int], run_lengths: list[int]) -> LoRABatch | None:
        """Runs of tokens (a sequence's new tokens) and their adapter slots (-1: none). None when no
        token of the step uses an adapter: the layers then skip the LoRA term."""
        layout = buffers.layout(run_slots, run_lengths)
        return None if layout is None else cls(*layout)


@dataclass
class _SegmentGroup:
    # Segments of some active slots, padded to the longest of them; padded rows repeat token 0 and their
    # results are dropped.
    index: torch.Tensor  # [num_segments, seg_len] int64 into [num_tokens + 1]
    valid: torch.Tensor  # [num_segments * seg_len] bool
    rows: torch.Tensor  # [num_valid] int64: the token each valid padded row belongs to
    slots: torch.Tensor | slice  # [num_segments] int64, or a slice when the slots are consecutive
    slots_host: list[int]


# Segments are bucketed by length (up to 16 tokens, then powers of two) and each bucket runs as one
# padded bmm: a skewed batch pads no segment to more than twice its length, and a batch of decodes
# or of similar prompt chunks takes a single bmm per layer.
_SHORT_SEGMENT = 16


def _segment_groups(meta: LoRAKernelMeta, starts: list[int], active_slots: list[int]) -> list[_SegmentGroup]:
    lengths = [hi - lo for lo, hi in zip(starts[:-1], starts[1:], strict=True)]
    buckets: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        bucket = 0 if n <= _SHORT_SEGMENT else (n - 1).bit_length()
        buckets.setdefault(bucket, []).append(i)
    return [_segment_group(meta, starts, lengths, members, active_slots) for members in buckets.values()]


def _segment_group(meta: LoRAKernelMeta, starts: list[int], lengths: list[int], members: list[int],
                   active_slots: list[int]) -> _SegmentGroup:
    num_tokens = meta.token_slots.shape[0]
    device = meta.token_slots.device
    seg_len = max(lengths[i] for i in members)
    start = torch.tensor([starts[i] for i in members], device=device)
    length = torch.tensor([lengths[i] for i in members], device=device)
    offsets = torch.arange(seg_len, device=device)
    valid = offsets.unsqueeze(0) < length.unsqueeze(1)  # [num_segments, seg_len]
    positions = (start.unsqueeze(1) + offsets).clamp(max=num_tokens - 1)
    index = torch.where(valid, meta.sorted_token_ids.long()[positions], 0)
    slots_host = [active_slots[i] for i in members]
    first = slots_host[0]
    # Consecutive slots (the common case for a fresh pool) index the slot weights as a view, not a copy.
    consecutive = slots_host == list(range(first, first + len(slots_host)))
    slots = slice(first, first + len(slots_host)) if consecutive else torch.tensor(slots_host, device=device)
    return _SegmentGroup(index, valid.flatten(), index.flatten()[valid.flatten()], slots, slots_host)


class TorchBackend:
    """Pure-torch ops: runs on every device; the CPU path."""

    name = "torch"

    def __init__(self, decode_mirror: bool = True) -> None:
        self._decode = DecodeKVCache() if decode_mirror else None

    def prepare(self, meta: AttentionMetadata, block_size: int) -> None:
        meta.plan = torch_attention.plan_paged_attention(meta.block_tables, meta.seq_lens_host,
                                                         meta.query_lens_host, block_size, meta.dtype)
        if self._decode is None:
            return
        if meta.max_query_len == 1:  # decodes only: every sequence is a row, in batch order
            self._decode.begin_step(meta.seq_ids, meta.seq_lens_host)
            return
        # The plan puts the decodes first, in batch order: the mirror's rows.
        decodes = [(seq_id, n) for seq_id, n, q in zip(meta.seq_ids, meta.seq_lens_host, meta.query_lens_host,
                                                       strict=True) if q == 1]
        self._decode.begin_step([seq_id for seq_id, _ in decodes], [n for _, n in decodes])

    def write_kv(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        torch_attention.write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        if self._decode is not None and self._decode.active:
            group = meta.plan.groups[0]
            if group.token_index is not None:
                key, value = key[group.token_index], value[group.token_index]
            self._decode.update(k_cache, v_cache, key, value, group.block_tables)

    def attention(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                  window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """query: [num_tokens, num_heads, head_dim]; key, value: this step's, already written by
        `write_kv` (used as they are by prompts with no cached context). `window`: a sliding-window
        layer's (each query sees its last `window` positions); `softcap`: Gemma 2's score soft-capping
        (see `reference.paged_attention`)."""
        groups = meta.plan.groups
        if len(groups) == 1:
            return self._attend(query, (key, value), k_cache, v_cache, groups[0], scale, window, softcap)
        out = torch.empty_like(query)
        for group in groups:
            index = group.token_index
            step_kv = (key[index], value[index]) if group.fresh else None  # only fresh prompts read them
            out[index] = self._attend(query[index], step_kv, k_cache, v_cache, group, scale, window, softcap)
        return out

    def _attend(self, query, step_kv, k_cache, v_cache, group: torch_attention.AttentionGroup, scale: float,
                window: int | None, softcap: float | None):
        kv = None
        if group.max_query_len == 1 and self._decode is not None and self._decode.active:
            kv = self._decode.keys_values(k_cache, group.max_kv_len)
        elif group.fresh:  # the keys as the cache holds them
            key, value = step_kv[0].to(k_cache.dtype), step_kv[1].to(v_cache.dtype)
            kv = torch_attention.pad_to_group(key, group), torch_attention.pad_to_group(value, group)
        return torch_attention.attend_group(query, k_cache, v_cache, group, scale, kv, window, softcap)

    def prepare_lora(self, batch: LoRABatch) -> None:
        batch.plan = _segment_groups(batch.meta, batch.seg_starts, batch.active_slots)

    def add_sparse(self, y: torch.Tensor, x: torch.Tensor, parts, batch: LoRABatch) -> None:
        """y += each token's slot's sparse part (`models.sparse_parts.SparseSlotParts`: a gather / scatter-add
        over the sparse pool's entries, or one CSR product per slot), as `reference.sparse_add`."""
        parts.add(y, x, batch.token_index, batch.active_slots, batch.seg_starts, batch.meta.sorted_token_ids)

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, batch: LoRABatch) -> None:
        """y += the adapter term of every token, as `reference.lora_shrink` then `lora_expand`.

        The CPU path batches segments with bmm: a few large matmuls per layer instead of one small
        one per adapter.
        """
        for group in batch.plan:
            rank = weights.max_rank_of(group.slots_host)  # padded rank columns hold zeros: skip them
            if rank > 0:
                self._add_lora_group(y, x, weights, group, rank)

    @staticmethod
    def _add_lora_group(y, x, weights: LoRAWeights, group: _SegmentGroup, rank: int) -> None:
        num_segments, seg_len = group.index.shape
        x_rows = x[group.index]  # [num_segments, seg_len, in]
        a = weights.a[group.slots, :, :rank]  # [num_segments, num_slices, rank, in]
        num_slices = a.shape[1]
        h = torch.bmm(x_rows, a.flatten(1, 2).transpose(1, 2))  # [num_segments, seg_len, num_slices * rank]
        h = h.view(num_segments, seg_len, num_slices, rank)
        scales = weights.scales[group.slots].to(h.dtype)  # [num_segments, num_slices]
        offsets = weights.slice_offsets
        deltas = []
        for i in range(num_slices):
            b = weights.b[group.slots, offsets[i] : offsets[i + 1], :rank]  # [num_segments, out_i, rank]
            deltas.append(torch.bmm(h[:, :, i] * scales[:, i, None, None], b.transpose(1, 2)))
        delta = torch.cat(deltas, dim=-1).flatten(0, 1)[group.valid]  # [num_valid, out]
        y[group.rows] += delta.to(y.dtype)  # each token sits in one segment: rows are unique


class TritonBackend(TorchBackend):
    """The Triton kernels: the paged decode kernel for decode-only steps, SDPA over gathered blocks for
    prefill, and the SGMV shrink/expand pair for every LoRA term. On CUDA they are compiled; on the CPU
    they run in Triton's interpreter (`select_backend` turns it on), which is how CI tests this path."""

    name = "triton"

    def __init__(self) -> None:
        super().__init__(decode_mirror=False)  # the paged kernel reads the cache directly
        from loraplex.kernels.lora_expand import lora_expand
        from loraplex.kernels.lora_shrink import lora_shrink
        from loraplex.kernels.paged_attention import paged_attention
        from loraplex.kernels.sparse_add import sparse_add

        self._shrink, self._expand, self._paged_attention = lora_shrink, lora_expand, paged_attention
        self._sparse_add = sparse_add

    def prepare(self, meta: AttentionMetadata, block_size: int) -> None:
        if meta.max_query_len > 1:
            super().prepare(meta, block_size)

    def attention(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                  window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        if meta.plan is not None:
            return super().attention(query, key, value, k_cache, v_cache, meta, scale, window, softcap)
        return self._paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                     meta.query_start_loc, scale, window, softcap)

    def prepare_lora(self, batch: LoRABatch) -> None:
        pass

    def add_sparse(self, y: torch.Tensor, x: torch.Tensor, parts, batch: LoRABatch) -> None:
        """The slots' sparse parts by the Triton kernel (`kernels/sparse_add`) over the sparse pool."""
        crow, starts, cols, vals, max_row_nnz = parts.csr_view(batch.active_slots)
        self._sparse_add(y, x, batch.meta.token_slots, crow, starts, cols, vals, max_row_nnz)

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, batch: LoRABatch) -> None:
        h = self._shrink(x, weights.a, weights.ranks, batch.meta)  # [num_tokens, num_slices, max_rank] fp32
        self._expand(y, h, weights.b, weights.ranks, weights.scales, batch.meta, weights.slice_offsets)


def select_backend(kind: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> TorchBackend:
    """`kind`: auto, torch or triton (config.KERNEL_BACKENDS). auto: Triton on CUDA where its kernels
    apply, torch elsewhere. triton: the Triton kernels on any device (interpreted on the CPU), or a refusal."""
    if kind == "torch":
        return TorchBackend()
    problem = _triton_problem(device, head_dim, dtype)
    if kind == "auto":
        return TritonBackend() if device.type == "cuda" and problem is None else TorchBackend()
    if problem is not None:
        raise invalid("kernel_backend", f"triton cannot run here: {problem}; use --kernel-backend torch")
    if device.type != "cuda":
        _use_triton_interpreter()
    return TritonBackend()


def _triton_problem(device: torch.device, head_dim: int, dtype: torch.dtype) -> str | None:
    if importlib.util.find_spec("triton") is None:  # found, not imported: see _use_triton_interpreter
        return "the triton package is not installed"
    if head_dim & (head_dim - 1) or head_dim > 256:
        return f"the paged attention kernel needs a head_dim that is a power of two up to 256, not {head_dim}"
    if device.type == "cpu" and dtype == torch.bfloat16:
        return "the CPU interpreter computes bf16 tl.dot wrongly (float32 and float16 are right)"
    return None


def _use_triton_interpreter() -> None:
    """Triton decides between compiling and interpreting when a function is defined (`@triton.jit`
    reads TRITON_INTERPRET, its own library's functions included), so the variable must be set before
    triton is first imported."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.cdiv, InterpretedFunction):
        raise invalid("kernel_backend", "triton on the CPU needs Triton's interpreter, but triton was imported "
                      "without it; set TRITON_INTERPRET=1 before starting")
