"""What a request has produced: its text (detokenized incrementally), logprobs, the deltas already
handed out, and the `RequestOutput`s made from them. The `Sequence` holds the scheduling state; this
holds everything a caller reads back."""

from __future__ import annotations

from collections import abc
from dataclasses import dataclass, field

from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.list_prefix import ListPrefix
from loraplex.engine.sequence import Sequence
from loraplex.errors import LoraplexError


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str  # all output text so far
    # All output tokens so far: a list once finished; before that a `ListPrefix` of the sequence's
    # own list (read-only, fixed at this output's tokens: `list()` it to concatenate or serialise),
    # so streaming copies nothing per step.
    token_ids: abc.Sequence[int]
    delta_text: str  # text new since the previous output of this request
    delta_token_ids: list[int]  # tokens new since the previous output of this request
    logprobs: abc.Sequence[TokenLogprob] | None  # as token_ids: a list once finished
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" (stop_reason says why)
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    adapter: str | None = None  # None = the base model
    error: LoraplexError | None = None  # finish_reason "error" through the request's fault: what to tell it
    # With params.prompt_logprobs, once the prompt is computed: one entry per prompt token, the first None
    # (nothing comes before it)
    prompt_logprobs: list[TokenLogprob | None] | None = None


class OutputState:
    """One request's output so far, beside its `Sequence`."""

    def __init__(self, seq: Sequence, prompt: str | None, detokenizer: IncrementalDetokenizer) -> None:
        self.seq = seq
        self.prompt = prompt  # the prompt's text, when it came as text
        self.detokenizer = detokenizer
        self.text = ""
        self.logprobs: list[TokenLogprob] = []
        self.num_emitted_chars = 0  # of text, handed out as deltas already
        self.num_emitted_tokens = 0  # output tokens handed out as deltas already

    def append(self, token: int, logprob: TokenLogprob | None, max_model_len: int, defer_text: bool = False) -> None:
        """Take the token the sequence just sampled (already appended to its token ids), extend the
        text, and finish the sequence on a stop token, a stop string, max_tokens or max_model_len.
        With `defer_text`, text is decoded once at the end instead of token by token."""
        seq = self.seq
        if logprob is not None:
            self.logprobs.append(logprob)
        previous_len = len(self.text)
        if token in seq.stop_token_ids:
            # The stop token adds no text, but bytes held back before it are still owed.
            self.text += self.detokenizer.flush(seq.token_ids[:-1])
            if not self._check_stop_strings(previous_len):
                seq.finish("stop", token)
            return
        if not defer_text:
            self.text += self.detokenizer.step(seq.token_ids)
        at_limit = seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= max_model_len
        if at_limit:
            self.text += self.detokenizer.flush(seq.token_ids)
        if not self._check_stop_strings(previous_len) and at_limit:
            seq.finish("length")

    def flush(self) -> None:
        """Decode what is still held back (a sequence that ended without a token of its own)."""
        self.text += self.detokenizer.flush(self.seq.token_ids)

    def _check_stop_strings(self, previous_len: int) -> bool:
        """Finish at the earliest stop string in the new text; True if one was found."""
        seq, text = self.seq, self.text
        if seq.num_output_tokens < seq.params.min_tokens:
            return False  # vLLM: stop strings are not looked for before min_tokens
        found: tuple[int, str] | None = None
        for stop in seq.params.stop:
            # Only the new text, plus enough before it for a stop string that straddles the boundary.
            index = text.find(stop, max(previous_len - len(stop) + 1, 0))
            if index >= 0 and (found is None or index < found[0]):
                found = (index, stop)
        if found is None:
            return False
        index, stop = found
        end = index + len(stop) if seq.params.include_stop_str_in_output else index
        self.text = text[:end]
        seq.finish("stop", stop)
        return True

    def make_output(self) -> RequestOutput:
        """The output so far, with what is new since the previous one as its deltas."""
        seq = self.seq
        finished = seq.is_finished
        # While running, hold back a tail that may still turn out to start a stop string.
        holdback = 0 if finished else max((len(s) - 1 for s in seq.params.stop), default=0)
        emit_upto = max(len(self.text) - holdback, self.num_emitted_chars)
        delta_text = self.text[self.num_emitted_chars : emit_upto]
        self.num_emitted_chars = emit_upto
        delta_token_ids = seq.token_ids[seq.num_prompt_tokens + self.num_emitted_tokens :]
        self.num_emitted_tokens += len(delta_token_ids)
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = list(self.logprobs) if finished else ListPrefix(self.logprobs)
        return RequestOutput(
            request_id=seq.request_id,
            prompt=self.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            text=self.text[:emit_upto],
            token_ids=seq.output_token_ids if finished else ListPrefix(seq.token_ids, seq.num_prompt_tokens),
            delta_text=delta_text,
            delta_token_ids=delta_token_ids,
            logprobs=logprobs,
            finished=finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            num_cached_tokens=seq.num_cached_tokens,
            adapter=seq.adapter,
            error=seq.error,
            prompt_logprobs=self._prompt_logprobs(),
        )

    def _prompt_logprobs(self) -> list[TokenLogprob | None] | None:
        seq = self.seq
        if seq.params.prompt_logprobs is None or len(seq.prompt_logprobs) < seq.num_prompt_tokens - 1:
            return None
        return [None, *seq.prompt_logprobs]
