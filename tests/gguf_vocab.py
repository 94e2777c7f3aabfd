"""The demo tokenizer as GGUF vocabulary metadata (tokenizer.ggml.tokens / token_type / merges), for the tests
that write GGUF files the way llama.cpp's converter does."""

from __future__ import annotations

import json
from pathlib import Path

TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's token types


def tokenizer_metadata(demo_dir: Path) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their types, merges "a b") of the byte-level BPE tokenizer.json in `demo_dir`."""
    spec = json.loads((Path(demo_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {index: token for token, index in spec["model"]["vocab"].items()}
    special = set()
    for added in spec["added_tokens"]:
        by_id[added["id"]] = added["content"]
        if added["special"]:
            special.add(added["id"])
    assert sorted(by_id) == list(range(len(by_id))), "token ids are not contiguous"
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [TOKEN_CONTROL if i in special else TOKEN_NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges
