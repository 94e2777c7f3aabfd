"""Structured outputs: grammar-constrained decoding with xgrammar.

A request's constraint (`Guide`: a JSON schema, any JSON object, a regex, a choice of strings or an EBNF
grammar) is compiled once per distinct constraint and kept in a bounded LRU (`Grammars`); each sequence
that carries one gets its own `GrammarMatcher`. Every step, the token mask of each constrained sequence
that samples is filled into a bitmask (in a worker thread, while the forward pass runs) and applied to its
row of logits before sampling; rows without a constraint are never touched. The sampled token is then
accepted into the matcher; a matcher that accepted a stop token (EOS), once the document is complete,
is terminated and its sequence finishes with "stop".

xgrammar was chosen over llguidance after measuring both on the CPU (docs/api.md): on a JSON schema its
masks took 6-9 us per token against 80-170 us for llguidance (demo and SmolLM2 vocabularies), and it
builds its tokenizer description from the vocabulary alone, without transformers.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from loraplex.errors import invalid

MAX_CACHED_GRAMMARS = 256
MAX_CHOICES = 1024  # strings of one guided_choice
MAX_GUIDE_CHARS = 256 * 1024  # a schema, regex or grammar text

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Guide:
    """One request's constraint. `kind`: json (a JSON schema, as JSON text), json_object (any JSON
    object), regex, choice (`text` is a JSON list of strings) or grammar (EBNF, as xgrammar reads it).
    `field`: the request field it came from, which an error names."""

    kind: str
    text: str
    field: str

    @staticmethod
    def of_choice(choices: list[str], field: str) -> Guide:
        if not choices or not all(isinstance(c, str) for c in choices):
            raise invalid(field, "must be a non-empty list of strings")
        if len(choices) > MAX_CHOICES:
            raise invalid(field, f"at most {MAX_CHOICES} choices, got {len(choices)}")
        return Guide("choice", json.dumps(choices), field)

    @staticmethod
    def of_schema(schema: dict | str | bool, field: str) -> Guide:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise invalid(field, f"is not a valid JSON schema: not JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise invalid(field, "must be a JSON schema (an object)")
        return Guide("json", json.dumps(schema), field)


def _choice_regex(choices: list[str]) -> str:
    special = set(r"\.^$*+?{}[]|()/")
    return "(" + "|".join("".join("\\" + c if c in special else c for c in choice) for choice in choices) + ")"


class Grammars:
    """Compiled grammars of one tokenizer, by constraint, at most MAX_CACHED_GRAMMARS (least recently used
    go first). Thread-safe: the API compiles in worker threads (so that a bad schema is a 400 before the
    request is queued), the engine finds the result here when it admits the request."""

    def __init__(self, tokenizer, vocab_size: int, max_cached: int = MAX_CACHED_GRAMMARS) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        # The vocabulary as the tokenizer stores it (byte-level pieces, or SentencePiece ones with <0x..>
        # byte fallback); added special tokens as "", which xgrammar treats as special (never in text).
        backend = tokenizer.backend
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        size = backend.get_vocab_size(with_added_tokens=True)
        vocab = ["" if i in special else (backend.id_to_token(i) or "") for i in range(size)]
        decoder = type(backend.decoder).__name__ if backend.decoder is not None else ""
        if decoder == "ByteLevel":
            vocab_type = xgr.VocabType.BYTE_LEVEL
        elif any(piece.startswith("<0x") for piece in vocab):
            vocab_type = xgr.VocabType.BYTE_FALLBACK
        else:
            vocab_type = xgr.VocabType.RAW
        self.info = xgr.TokenizerInfo(vocab, vocab_type, vocab_size=max(vocab_size, size),
                                      stop_token_ids=list(tokenizer.eos_token_ids))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.max_cached = max_cached
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.Lock()
        self.compilations = 0

    def compile(self, guide: Guide):
        """The compiled grammar of `guide`, from the cache or compiled now; LoraplexError naming the
        guide's field when it is not a valid schema, regex or grammar."""
        key = (guide.kind, guide.text)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        if len(guide.text) > MAX_GUIDE_CHARS:
            raise invalid(guide.field, f"at most {MAX_GUIDE_CHARS} characters, got {len(guide.text)}")
        try:
            compiled = self._compile(guide)
        except Exception as e:  # xgrammar raises RuntimeError (and others) with the parser's message
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            message = message.split("] ", 1)[-1].split(".cc:", 1)[-1].lstrip("0123456789: ")
            what = {"json": "JSON schema", "regex": "regular expression", "grammar": "grammar",
                    "choice": "choice", "json_object": "JSON object"}[guide.kind]
            raise invalid(guide.field, f"is not a valid {what} for structured output: {message}") from None
        with self._lock:
            self.compilations += 1
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, guide: Guide):
        c = self.compiler
        if guide.kind == "json":
            return c.compile_json_schema(guide.text, any_whitespace=False)
        if guide.kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if guide.kind == "regex":
            return c.compile_regex(guide.text)
        if guide.kind == "choice":
            return c.compile_regex(_choice_regex(json.loads(guide.text)))
        if guide.kind == "grammar":
            return c.compile_grammar(guide.text)
        raise invalid(guide.field, f"unknown structured output kind {guide.kind!r}")

    def matcher(self, guide: Guide):
        return self._xgr.GrammarMatcher(self.compile(guide))


class MaskFiller:
    """Fills the token bitmask of the constrained rows of a step, in one worker thread, so that it runs
    while the forward pass does (xgrammar lets go of the GIL while it fills)."""

    def __init__(self, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loraplex-grammar")

    def start(self, matchers: list) -> Future | None:
        """`matchers`: one per sampled row, None for an unconstrained row. None when no row is constrained."""
        rows = [row for row, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        return self._pool.submit(self._fill, matchers, rows)

    def _fill(self, matchers: list, rows: list[int]) -> tuple[torch.Tensor, list[int]]:
        bitmask = self._xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for row in rows:
            matchers[row].fill_next_token_bitmask(bitmask, row)
        return bitmask, rows

    def apply(self, future: Future | None, logits: torch.Tensor) -> None:
        """Mask (to -inf), in place, the tokens each constrained row may not take next."""
        if future is None:
            return
        bitmask, rows = future.result()
        self._xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                              vocab_size=min(self.vocab_size, logits.shape[-1]), indices=rows)
