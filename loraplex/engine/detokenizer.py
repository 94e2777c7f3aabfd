"""Incremental detokenization that never emits half of a multi-byte character."""

from __future__ import annotations

from loraplex.models.tokenizer import Tokenizer

# Tokens decoded again on each step, so that merges across token boundaries (spaces, byte pairs)
# come out as the full decode would render them.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = max(len(prompt_token_ids) - _CONTEXT_TOKENS, 0)
        self.read_offset = len(prompt_token_ids)

    def step(self, all_token_ids: list[int]) -> str:
        """The new text that `all_token_ids` (prompt + output so far) adds; '' while a character is
        still incomplete (its bytes continue in the next token)."""
        decode = self.tokenizer.decode
        prefix = decode(all_token_ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = decode(all_token_ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(all_token_ids)
        return full[len(prefix) :]

    def flush(self, all_token_ids: list[int]) -> str:
        """At the end of generation: whatever is left, incomplete bytes rendered as U+FFFD."""
        decode = self.tokenizer.decode
        prefix = decode(all_token_ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = decode(all_token_ids[self.prefix_offset :], self.skip_special_tokens)
        self.prefix_offset = self.read_offset = len(all_token_ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""
