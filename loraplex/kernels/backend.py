"""The kernel backend: chosen once from the device, so model code never branches on it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.kernels import reference


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the paged KV cache; built once per step by the runner."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: block * block_size + offset
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int
    plan: object = field(default=None)  # backend-specific layout, filled by `Backend.prepare`


class TorchBackend:
    """Pure-torch ops: runs on every device; the CPU path."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata, block_size: int) -> None:
        meta.plan = reference.plan_paged_attention(
            meta.block_tables, meta.seq_lens, meta.query_start_loc, block_size
        )

    def write_kv(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        reference.write_kv(key, value, k_cache, v_cache, meta.slot_mapping)

    def attention(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return reference.paged_attention_planned(query, k_cache, v_cache, meta.plan, scale)


class TritonBackend(TorchBackend):
    """CUDA: the Triton paged kernel for decode-only steps, SDPA over gathered blocks for prefill."""

    name = "triton"

    def prepare(self, meta: AttentionMetadata, block_size: int) -> None:
        if meta.max_query_len > 1:
            super().prepare(meta, block_size)

    def attention(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.plan is not None:
            return super().attention(query, k_cache, v_cache, meta, scale)
        from loraplex.kernels.paged_attention import paged_attention

        return paged_attention(
            query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale
        )


def select_backend(device: torch.device) -> TorchBackend:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return TorchBackend()
        return TritonBackend()
    return TorchBackend()
