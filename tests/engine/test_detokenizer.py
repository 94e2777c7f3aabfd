"""IncrementalDetokenizer with real `tokenizers` tokenizers: multi-byte characters whose bytes span
several tokens must come out whole, never as U+FFFD, and the streamed pieces must add up to the
full decode."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.models.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"

CORPUS = [
    "The café on the corner serves crème brûlée and piña colada.",
    "naïve façade, déjà vu, São Paulo, Zürich, Ångström, smörgåsbord",
    "日本語のテキストを少し書きます。東京は日本の首都です。",
    "中文文本：我们在北京吃饭。你好，世界！",
    "한국어 문장도 조금 있습니다.",
    "Ελληνικά και русский текст тоже.",
    "plain ascii words and numbers 12345 to round things out",
] * 20

TEXTS = [
    "Hello, world!",
    "café crème brûlée",
    "日本語のテキスト",
    "emoji 🙂🎉 and 👩‍👩‍👧 family",
    "mixed: naïve 中文 🙂 Zürich 한국어 ∑∞ 𝔘𝔫𝔦",
    "𠜎𠜱𠝹 rare CJK (4-byte) and 🏳️‍🌈",
    "  spaces\tand\nnewlines é\n",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@pytest.fixture(scope="module")
def trained_tokenizer() -> Tokenizer:
    """A small byte-level BPE trained here (deterministic): CJK and accented letters get merged
    tokens, rarer characters (emoji) stay split into their bytes."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return Tokenizer(backend)


@pytest.fixture(scope="module")
def crafted_tokenizer() -> Tokenizer:
    """Byte-level BPE with merges chosen to cut characters awkwardly: tokens that hold the end of one
    character and the start of the next, and emoji split in halves."""
    byte_char = bytes_to_unicode()
    vocab = {byte_char[b]: b for b in range(256)}

    def chars(data: bytes) -> str:
        return "".join(byte_char[b] for b in data)

    pieces = [
        "é".encode()[1:] + "日".encode()[:1],  # A9 E6: é's tail + 日's head
        "日".encode()[1:],  # 97 A5
        "日".encode()[2:] + "本".encode()[:2],  # A5 E6 9C: needs two merges
        "🙂".encode()[:2],  # F0 9F
        "🙂".encode()[2:],  # 99 82
        "ñ".encode()[1:] + b"o",  # B1 'o'
    ]
    merges = []
    for piece in pieces:
        text = chars(piece)
        for end in range(2, len(text) + 1):
            left, right = text[: end - 1], text[end - 1]
            if text[:end] not in vocab:
                vocab[text[:end]] = len(vocab)
                merges.append((left, right))
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend)


@pytest.fixture(scope="module")
def byte_fallback_tokenizer() -> Tokenizer:
    """SentencePiece-style (Llama 2, Mistral): '▁' for spaces, <0xNN> byte fallback, leading space
    stripped on decode."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}}
    words = ["▁", "▁c", "▁ca", "▁caf", "▁a", "▁an", "▁and", "é"]
    merges = [("▁", "c"), ("▁c", "a"), ("▁ca", "f"), ("▁", "a"), ("▁a", "n"), ("▁an", "d")]
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(letter, len(vocab))
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>",
                                     fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)
    ])
    return Tokenizer(backend)


def stream(tokenizer: Tokenizer, prompt_ids: list[int], output_ids: list[int]) -> list[str]:
    """Feed the output one token at a time, as the engine does; the last piece is the flush."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=True)
    all_ids = list(prompt_ids)
    pieces = []
    for token in output_ids:
        all_ids.append(token)
        pieces.append(detok.step(all_ids))
    pieces.append(detok.flush(all_ids))
    return pieces


def splits_a_character(tokenizer: Tokenizer, ids: list[int]) -> bool:
    return any(REPLACEMENT in tokenizer.decode([t]) for t in ids)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "Q: ", "日本語🙂 é: "])
@pytest.mark.parametrize("which", ["trained_tokenizer", "crafted_tokenizer", "byte_fallback_tokenizer"])
def test_streamed_pieces_are_whole_characters_and_add_up(request, which, prompt, text):
    tokenizer = request.getfixturevalue(which)
    prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.encode("x")[0]]
    output_ids = tokenizer.encode(text)
    if which != "byte_fallback_tokenizer":
        assert tokenizer.decode(output_ids) == text  # byte-level BPE round-trips exactly
    # the reference: what the whole sequence decodes to, past the prompt's text
    whole, prompt_text = tokenizer.decode(prompt_ids + output_ids), tokenizer.decode(prompt_ids)
    assert whole.startswith(prompt_text)
    full = whole[len(prompt_text) :]
    pieces = stream(tokenizer, prompt_ids, output_ids)
    for i, piece in enumerate(pieces):
        assert REPLACEMENT not in piece, f"piece {i} {piece!r} of {pieces!r}"
    assert "".join(pieces) == full
    assert pieces[-1] == ""  # nothing was held back at the end of complete text


def test_the_tokenizers_really_split_characters(trained_tokenizer, crafted_tokenizer, byte_fallback_tokenizer):
    # Without this the test above would pass trivially.
    for tokenizer in (trained_tokenizer, crafted_tokenizer, byte_fallback_tokenizer):
        ids = tokenizer.encode("emoji 🙂🎉 and 👩‍👩‍👧 family")
        assert splits_a_character(tokenizer, ids)
    # the crafted tokenizer has tokens that straddle two characters
    ids = crafted_tokenizer.encode("café日本")
    straddling = [t for t in ids if crafted_tokenizer.decode([t]).count(REPLACEMENT) >= 2]
    assert straddling, [crafted_tokenizer.decode([t]) for t in ids]


def test_an_incomplete_character_is_held_back_then_emitted_whole(crafted_tokenizer):
    tok = crafted_tokenizer
    ids = tok.encode("a🙂b")
    assert len(ids) == 4  # a, F0 9F, 99 82, b
    pieces = stream(tok, tok.encode("x"), ids)
    assert pieces == ["a", "", "🙂", "b", ""]


def test_flush_emits_an_unfinished_character_as_replacement(crafted_tokenizer):
    tok = crafted_tokenizer
    ids = tok.encode("a🙂")[:-1]  # generation stopped halfway through the emoji
    pieces = stream(tok, tok.encode("x"), ids)
    assert pieces[:-1] == ["a", ""]
    assert pieces[-1] == REPLACEMENT


def test_long_prompt_and_long_output(trained_tokenizer):
    tok = trained_tokenizer
    prompt = "日本語のテキスト🙂 " * 10  # the context window starts inside the prompt
    text = " ".join(TEXTS) * 3
    pieces = stream(tok, tok.encode(prompt), tok.encode(text))
    assert all(REPLACEMENT not in piece for piece in pieces)
    assert "".join(pieces) == text


class CountingTokenizer(Tokenizer):
    """Records how many ids each decode call is given."""

    def __init__(self, inner: Tokenizer) -> None:
        super().__init__(inner.backend)
        self.sizes: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def test_each_step_decodes_a_bounded_window(trained_tokenizer):
    # Decoding the whole output on every step would be quadratic in its length.
    tok = CountingTokenizer(trained_tokenizer)
    text = " ".join(TEXTS) * 8
    output_ids = tok.encode(text)
    assert len(output_ids) > 400
    pieces = stream(tok, tok.encode("a prompt of some length " * 5), output_ids)
    assert "".join(pieces) == text
    assert max(tok.sizes) <= 24, max(tok.sizes)
