"""Turns a scheduled batch into tensors, runs the model, and samples."""

from __future__ import annotations

import itertools
import logging
from array import array
from dataclasses import dataclass, field

import torch

from loraplex.engine.block_manager import BlockManager
from loraplex.engine.guided import MaskFiller
from loraplex.engine.logits_processors import process_logits
from loraplex.engine.output import TokenLogprob
from loraplex.engine.sampling import Sampler, SampleResult
from loraplex.engine.scheduler import SchedulerOutput
from loraplex.engine.sequence import Sequence
from loraplex.kernels.backend import AttentionMetadata, LoRABatch
from loraplex.kernels.lora_meta import LoRAMetaBuffers
from loraplex.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

PROMPT_LOGPROBS_CHUNK = 512  # prompt positions whose vocabulary logits are made at once
_ARRAY_CODES = {torch.int32: "i", torch.int64: "q"}


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    lora: LoRABatch | None
    sample_indices: torch.Tensor | None  # [num_sampled]: rows of the hidden states that give logits; None: all
    sampled_seqs: list[Sequence]
    # (sequence, row of its first position, first position, end position): prompt positions whose
    # logprobs of the next prompt token are asked for (params.prompt_logprobs)
    prompt_rows: list[tuple[Sequence, int, int, int]] = field(default_factory=list)


@dataclass
class StepResult:
    sampled_seqs: list[Sequence]  # the sequences that sampled a token this step
    sample: SampleResult | None
    nonfinite_rows: set[int]  # rows of sampled_seqs whose logits held a NaN or an infinity


def kv_cache_block_bytes(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, block_manager: BlockManager, dtype: torch.dtype,
                 device: torch.device, seed: int, max_num_batched_tokens: int, max_loras: int) -> None:
        self.model = model
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.device = device
        self.sampler = Sampler(device, seed)
        c = model.config
        # [2, num_layers, num_blocks + 1, block_size, num_kv_heads, head_dim]: one allocation for all
        # layers; the last block is the zero padding block of the block tables.
        self.kv_cache = torch.zeros(
            2, c.num_layers, block_manager.num_blocks + 1, self.block_size, c.num_kv_heads, c.head_dim,
            dtype=dtype, device=device,
        )
        for i, attn in enumerate(model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        self.lora_buffers = LoRAMetaBuffers(max_num_batched_tokens, max_loras, device) if max_loras else None
        self.masks: MaskFiller | None = None  # structured outputs: made at the first constrained request

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> StepResult:
        """Run one step: the sequences that sampled a token, what they sampled, and which of them had
        non-finite logits (their samples mean nothing)."""
        inputs = self.prepare(batch)
        # Structured outputs: the token masks of constrained rows are filled in a worker thread while the
        # forward pass runs, and applied to their logits before sampling; other rows are not touched.
        masks = None
        if any(seq.matcher is not None for seq in inputs.sampled_seqs):
            if self.masks is None:
                self.masks = MaskFiller(self.model.config.vocab_size)
            masks = self.masks.start([seq.matcher for seq in inputs.sampled_seqs])
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, inputs.lora)  # [num_tokens, hidden]
        if inputs.prompt_rows:
            self._record_prompt_logprobs(hidden, inputs.prompt_rows)
        if not inputs.sampled_seqs:
            return StepResult([], None, set())
        if inputs.sample_indices is not None:
            hidden = hidden[inputs.sample_indices]
        logits = self.model.compute_logits(hidden)  # [num_sampled, vocab]
        # A NaN or infinity in a row (an adapter that overflows, say) stays in that row: rows are
        # independent in every layer, and padded attention reads only zeroed memory. The row is
        # sampled from zeros so the sampler sees numbers; the engine ends its sequence.
        nonfinite = ~torch.isfinite(logits).all(dim=-1)  # [num_sampled]
        logits.masked_fill_(nonfinite.unsqueeze(1), 0.0)
        if masks is not None:
            self.masks.apply(masks, logits)  # -inf where a constrained row's grammar allows no token
        params = [seq.params for seq in inputs.sampled_seqs]
        generators = [seq.generator for seq in inputs.sampled_seqs]
        processed = process_logits(logits, inputs.sampled_seqs)  # min_tokens, logit_bias, penalties
        sampled = self.sampler(processed, params, generators,  # reads its tokens back: the step is done
                               raw_logits=None if processed is logits else logits)
        bad_rows = set(nonfinite.nonzero().flatten().tolist()) if nonfinite.any() else set()
        return StepResult(inputs.sampled_seqs, sampled, bad_rows)

    def _record_prompt_logprobs(self, hidden: torch.Tensor, rows: list[tuple[Sequence, int, int, int]]) -> None:
        """Append to each sequence's `prompt_logprobs` the logprob of prompt token p + 1 given the
        positions up to p, for p in [first, end), with the k most likely; the vocabulary's logits are
        made PROMPT_LOGPROBS_CHUNK positions at a time, so a long prompt costs bounded memory."""
        for seq, row, first, end in rows:
            k = seq.params.prompt_logprobs or 0
            for start in range(first, end, PROMPT_LOGPROBS_CHUNK):
                stop = min(end, start + PROMPT_LOGPROBS_CHUNK)
                h = hidden[row + start - first : row + stop - first]
                logprobs = self.model.compute_logits(h).log_softmax(dim=-1)
                targets = seq.token_ids[start + 1 : stop + 1]
                index = torch.tensor(targets, dtype=torch.int64, device=logprobs.device).unsqueeze(1)
                chosen = logprobs.gather(1, index).squeeze(1).tolist()
                if k:
                    values, indices = logprobs.topk(k, dim=-1)
                    tops = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(),
                                                                          strict=True)]
                else:
                    tops = [[] for _ in targets]
                seq.prompt_logprobs.extend(TokenLogprob(t, lp, top)
                                           for t, lp, top in zip(targets, chosen, tops, strict=True))

    def prepare(self, batch: SchedulerOutput) -> StepInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_lens: list[int] = []
        sample_indices: list[int] = []
        sampled: list[Sequence] = []
        prompt_rows: list[tuple[Sequence, int, int, int]] = []
        num_tokens = 0
        for seq, num_new in batch.scheduled:
            start = seq.num_computed_tokens
            end = start + num_new
            if num_new == 1:  # a decode: the common case, kept cheap
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(self.block_manager.slot(seq, start))
            else:
                input_ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend(self.block_manager.slots(seq, start, end))
            if seq.params.prompt_logprobs is not None:
                first = max(start, len(seq.prompt_logprobs))  # recomputed positions are not recorded again
                last = min(end, seq.num_prompt_tokens - 1)
                if first < last:
                    prompt_rows.append((seq, num_tokens + first - start, first, last))
            seq_lens.append(end)
            query_lens.append(num_new)
            num_tokens += num_new
            if end == seq.num_tokens:  # the whole known sequence is computed: sample the next token
                sample_indices.append(num_tokens - 1)
                sampled.append(seq)
        max_blocks = max(len(seq.block_table) for seq, _ in batch.scheduled)
        block_tables: list[int] = []  # [num_seqs, max_blocks], flat
        padding = self.block_manager.padding_block
        for seq, _ in batch.scheduled:
            block_tables += seq.block_table
            block_tables += [padding] * (max_blocks - len(seq.block_table))
        fresh = self.block_manager.take_fresh()
        if fresh:  # what earlier owners left in them must not reach this step's padded reads
            self.kv_cache.index_fill_(2, self._tensor(fresh, torch.int64), 0)
        as_tensor = self._tensor
        meta = AttentionMetadata(
            slot_mapping=as_tensor(slots, torch.int64),
            block_tables=as_tensor(block_tables, torch.int32).view(len(batch.scheduled), max_blocks),
            seq_lens=as_tensor(seq_lens, torch.int32),
            query_start_loc=as_tensor(list(itertools.accumulate(query_lens, initial=0)), torch.int32),
            max_query_len=max(query_lens),
            seq_ids=tuple(seq.serial for seq, _ in batch.scheduled),
            seq_lens_host=seq_lens,
            query_lens_host=query_lens,
            dtype=self.kv_cache.dtype,
        )
        self.model.backend.prepare(meta, self.block_size)
        lora = None
        if self.lora_buffers is not None and any(seq.lora_slot >= 0 for seq, _ in batch.scheduled):
            lora = LoRABatch.make(self.lora_buffers, [seq.lora_slot for seq, _ in batch.scheduled], query_lens)
            self.model.backend.prepare_lora(lora)
        return StepInputs(
            input_ids=as_tensor(input_ids, torch.int64),
            positions=as_tensor(positions, torch.int64),
            meta=meta,
            lora=lora,
            # Decode-only steps sample every row: no copy of the hidden states.
            sample_indices=None if len(sample_indices) == num_tokens else as_tensor(sample_indices, torch.int64),
            sampled_seqs=sampled,
            prompt_rows=prompt_rows,
        )

    def _tensor(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        # Built on the host and copied once; pinned memory makes the copy asynchronous on CUDA.
        # Through a typed array: several times faster than torch.tensor on a list.
        t = torch.frombuffer(array(_ARRAY_CODES[dtype], values), dtype=dtype) if values else torch.empty(0, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t
