"""Tokenizer.token_bytes: each token's own bytes, which join back into the text even where one
character spans several tokens, checked on a byte-level BPE and on a SentencePiece-style tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from loraplex.models.tokenizer import Tokenizer

TEXTS = ["Hello wörld — Ъ 你好 🙂", "  def f(x):\n\treturn x ** 2", "naïve café ß ∑"]


def test_byte_level_tokens_rebuild_the_text(demo_dir):
    tokenizer = Tokenizer.from_dir(demo_dir)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces = [tokenizer.token_bytes(i) for i in ids]
        assert b"".join(pieces) == text.encode()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_a_partial_character_token_has_its_own_bytes(demo_dir):
    tokenizer = Tokenizer.from_dir(demo_dir)
    ids = tokenizer.encode("Ъ🙂", add_special_tokens=False)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    assert len(ids) > 1 and not all(_is_utf8(p) for p in pieces), "expected the emoji split over tokens"
    assert all(tokenizer.decode([i]) == "\ufffd" for i, p in zip(ids, pieces, strict=True) if not _is_utf8(p))
    assert b"".join(pieces).decode() == "Ъ🙂"


@pytest.fixture(scope="module")
def sentencepiece_style() -> Tokenizer:
    """A BPE with byte fallback and '▁' for spaces, as Llama 2 and Mistral tokenizers are."""
    backend = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *alphabet],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz\u2581"))
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>")


def test_sentencepiece_style_tokens_rebuild_the_text(sentencepiece_style):
    tok = sentencepiece_style
    for text in ["the lazy fox", "the café Ъ"]:
        ids = tok.backend.encode(text).ids
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
