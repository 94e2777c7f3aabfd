"""Per-sequence logits processing before sampling: `min_tokens`, `logit_bias`, and the repetition,
frequency and presence penalties, applied in vLLM's order (min_tokens and logit_bias, then the
repetition penalty, then frequency and presence). Only the rows of sequences that ask for one of them
are touched: a batch where none does pays one attribute check per row and nothing on the device.

Penalty state. A sequence with a penalty keeps, on the device, the counts of its output tokens
([vocab] fp32, updated incrementally with the tokens sampled since the previous step) and, for the
repetition penalty, a [vocab] bool mask of its prompt's tokens. That is 5 bytes per vocabulary entry
per penalized sequence (640 KiB for a 128k vocabulary), against a sparse structure that would need a
sort or a hash per step; it is bounded by the running sequences: the state is dropped when a
sequence finishes or is preempted (the scheduler clears it) and rebuilt from its token ids, which
are always kept, when it runs again.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from loraplex.engine.sampling import SamplingParams


def wants_processing(params: SamplingParams) -> bool:
    return bool(params.min_tokens or params.logit_bias or has_penalty(params))


def has_penalty(params: SamplingParams) -> bool:
    return params.presence_penalty != 0 or params.frequency_penalty != 0 or params.repetition_penalty != 1


class PenaltyState:
    """One sequence's output token counts (and prompt mask, for the repetition penalty), on the device."""

    __slots__ = ("counts", "prompt_mask", "num_counted")

    def __init__(self, prompt_token_ids: list[int], vocab: int, device: torch.device, repetition: bool) -> None:
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.prompt_mask = None
        if repetition:
            self.prompt_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.prompt_mask[torch.tensor(prompt_token_ids, dtype=torch.int64, device=device)] = True
        self.num_counted = 0  # output tokens already in `counts`

    def update(self, token_ids: Seq[int], num_prompt_tokens: int) -> None:
        new = token_ids[num_prompt_tokens + self.num_counted:]
        if new:
            index = torch.tensor(list(new), dtype=torch.int64, device=self.counts.device)
            self.counts.index_put_((index,), torch.ones_like(index, dtype=torch.float32), accumulate=True)
            self.num_counted += len(new)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, prompt_mask: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """logits: [m, vocab]; counts: [m, vocab] output token counts; prompt_mask: [m, vocab] bool; the
    penalties: [m]. The repetition penalty (CTRL, as transformers and vLLM apply it) divides positive
    logits and multiplies negative ones of every token seen in the prompt or the output; then OpenAI's
    logits -= frequency * count + presence * (count > 0), over the output only."""
    output_mask = counts > 0
    seen = prompt_mask | output_mask
    rep = repetition.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * output_mask


def process_logits(logits: torch.Tensor, seqs: list) -> torch.Tensor:
    """`logits` ([n, vocab], one row per sequence of `seqs`) with each sequence's min_tokens,
    logit_bias and penalties applied; the tensor itself when no sequence asks for any (otherwise a
    new tensor: `logits` stays the model's own, for logprobs)."""
    rows = [row for row, seq in enumerate(seqs) if wants_processing(seq.params)]
    if not rows:
        return logits
    out = logits.clone()
    dev = logits.device
    vocab = logits.shape[-1]
    mask_rows: list[int] = []
    mask_ids: list[int] = []
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_values: list[float] = []
    penalty_rows: list[int] = []
    for row in rows:
        seq = seqs[row]
        params = seq.params
        if params.min_tokens and seq.num_output_tokens < params.min_tokens:
            # vLLM: EOS and the stop token ids cannot be sampled before min_tokens (ignore_eos leaves EOS out
            # of the stop set, so it stays allowed, as in vLLM)
            stops = [t for t in seq.stop_token_ids if 0 <= t < vocab]
            mask_rows += [row] * len(stops)
            mask_ids += stops
        if params.logit_bias:
            bias_rows += [row] * len(params.logit_bias)
            bias_ids += list(params.logit_bias)
            bias_values += list(params.logit_bias.values())
        if has_penalty(params):
            penalty_rows.append(row)
    if bias_rows:
        out.index_put_((_ids(bias_rows, dev), _ids(bias_ids, dev)),
                       torch.tensor(bias_values, dtype=out.dtype, device=dev), accumulate=True)
    if mask_rows:
        out[_ids(mask_rows, dev), _ids(mask_ids, dev)] = float("-inf")
    if penalty_rows:
        states = []
        for row in penalty_rows:
            seq = seqs[row]
            state = seq.penalty_state
            if state is None:
                state = seq.penalty_state = PenaltyState(seq.prompt_token_ids, vocab, dev,
                                                         seq.params.repetition_penalty != 1)
            state.update(seq.token_ids, seq.num_prompt_tokens)
            states.append(state)
        index = _ids(penalty_rows, dev)
        counts = torch.stack([s.counts for s in states])
        no_prompt = torch.zeros(vocab, dtype=torch.bool, device=dev)
        prompt_mask = torch.stack([s.prompt_mask if s.prompt_mask is not None else no_prompt for s in states])
        params = [seqs[row].params for row in penalty_rows]
        penalized = apply_penalties(
            out[index], counts, prompt_mask,
            torch.tensor([p.presence_penalty for p in params], dtype=out.dtype, device=dev),
            torch.tensor([p.frequency_penalty for p in params], dtype=out.dtype, device=dev),
            torch.tensor([p.repetition_penalty for p in params], dtype=out.dtype, device=dev),
        )
        out[index] = penalized
    return out


def _ids(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)
