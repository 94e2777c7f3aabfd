"""One request's scheduling state as it moves through the engine."""

from __future__ import annotations

import enum

import torch

from loraplex.engine.sampling import SamplingParams
from loraplex.errors import LoraplexError


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request's scheduling state: its tokens, how many are in the KV cache, its blocks, its
    adapter and slot. What it has produced for the caller (text, logprobs) is its `OutputState`."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stop_token_ids: frozenset[int],
        generator: torch.Generator | None,
        serial: int = -1,
    ) -> None:
        self.request_id = request_id
        # Unique among the engine's sequences for its whole life, unlike a request id, which a
        # caller may reuse once the request has finished: what kernel backends key per-sequence
        # state by. Given by the engine when it takes the request.
        self.serial = serial
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.stop_token_ids = stop_token_ids
        self.generator = generator
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + output
        self.num_computed_tokens = 0  # tokens whose keys and values are in the cache
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.stop_reason: int | str | None = None  # the stop token id or string that ended it
        self.error: LoraplexError | None = None  # why it ended in error, typed, when it is the request's fault
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache on first admission
        self.adapter: str | None = None  # adapter name; None = the base model
        # Which registration of that name it runs on; also salts its prefix-cache blocks, since KV
        # computed under one registration differs from another's.
        self.adapter_key: str | None = None
        self.lora_slot = -1  # the adapter's slot while running
        self.num_skips = 0  # scheduling rounds passed over while waiting for its adapter
        self.matcher = None  # structured output: its xgrammar GrammarMatcher, when params.guide is set
        # Output token counts on the device, for penalties (loraplex.engine.logits_processors): made at the
        # first step that needs them, dropped on preemption and rebuilt from token_ids.
        self.penalty_state = None
        # With params.prompt_logprobs: the logprob entries (TokenLogprob) of prompt tokens 1.. so far; kept
        # across preemption (the recomputed positions are not recorded again).
        self.prompt_logprobs: list = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None, error: LoraplexError | None = None) -> None:
        """`error`: with reason "error", what went wrong as the caller should be told (typed)."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason if error is None else str(error)
        self.error = error

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"status={self.status.value})")
