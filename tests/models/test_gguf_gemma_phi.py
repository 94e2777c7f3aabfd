"""GGUF files of llama.cpp's `gemma2`, `gemma3` and `phi3` architectures, written with `gguf.GGUFWriter` from
tiny random Hugging Face checkpoints the way llama.cpp's convert_hf_to_gguf.py writes them: tensor names from
the `gguf` package's own name map (Gemma's pre/post norms, Phi-3's fused attn_qkv and ffn_up), Gemma's norm
weights stored as 1 + weight, Phi-3's LongRoPE factors as the tensors rope_factors_long/short with the
original context and attention factor as metadata, and the metadata keys the converter sets for each.

References, never loraplex code: the original checkpoint (config fields, tensors, logits) and transformers
reading the very GGUF file (`from_pretrained(dir, gguf_file=name)`: its state dict, the config fields it reads
from the file, its logits given the fields it does not read, its tokenizer). The model files carry the demo's
byte-level BPE vocabulary or a SentencePiece one (tokenizer.ggml.model "llama": pieces learned from the demo
corpus, with scores and byte-fallback tokens, laid out as Gemma's and Phi-3's files have them); the engine
serves both."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf_vocab import tokenizer_metadata

from loraplex.models.gguf import convert_gguf, read_gguf

VOCAB = 2048  # the demo tokenizer's
HIDDEN, HEADS, KV_HEADS = 64, 4, 2
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=None,
              attn_implementation="eager")
WINDOW = 8  # shorter than the test prompts, so the local layers' window matters
# The fields of each config that read_gguf must give back (the rest are the class defaults on both sides).
CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                 "tie_word_embeddings", "sliding_window")
FIELDS = {
    "gemma2": CONFIG_FIELDS + ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                               "hidden_activation", "layer_types"),
    "gemma3": CONFIG_FIELDS + ("query_pre_attn_scalar", "final_logit_softcapping", "hidden_activation",
                               "layer_types"),
    "phi3": CONFIG_FIELDS + ("hidden_act", "original_max_position_embeddings"),
    "phi3-longrope": CONFIG_FIELDS + ("hidden_act", "original_max_position_embeddings"),
}
# Fields transformers' GGUF loader reads from these files (the rest it takes from the config class defaults,
# so the test hands it those).
TRANSFORMERS_READS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")


def reference_model(kind: str, **vocabulary) -> transformers.PreTrainedModel:
    """A tiny random checkpoint of `kind`; norm weights away from their identity so a misplaced +1 shows.
    `vocabulary`: vocab_size and special ids other than the demo tokenizer's."""
    common = COMMON | vocabulary
    if kind == "gemma2":
        config = transformers.Gemma2Config(
            num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
            max_position_embeddings=512, attn_logit_softcapping=4.0, final_logit_softcapping=6.0,
            rope_theta=10000.0, **common)
    elif kind == "gemma3":
        config = transformers.Gemma3TextConfig(
            num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW,
            max_position_embeddings=512, rope_theta=1000000.0, rope_local_base_freq=10000.0,
            sliding_window_pattern=6, **common)
    elif kind == "phi3":  # Phi-3-mini-4k: full rotary, a sliding window, untied head
        config = transformers.Phi3Config(
            num_hidden_layers=2, max_position_embeddings=512, original_max_position_embeddings=512,
            sliding_window=WINDOW, rope_theta=10000.0, tie_word_embeddings=False, **({"pad_token_id": 4} | common))
    else:  # Phi-4-mini: partial rotary, LongRoPE, tied head
        rotary = int(HIDDEN // HEADS * 0.75)
        gen = torch.Generator().manual_seed(5)
        scaling = {"rope_type": "longrope", "long_factor": (1 + 4 * torch.rand(rotary // 2, generator=gen)).tolist(),
                   "short_factor": (1 + 0.5 * torch.rand(rotary // 2, generator=gen)).tolist()}
        config = transformers.Phi3Config(
            num_hidden_layers=2, max_position_embeddings=256, original_max_position_embeddings=32,
            partial_rotary_factor=0.75, rope_scaling=dict(scaling, rope_theta=10000.0, partial_rotary_factor=0.75),
            sliding_window=None, tie_word_embeddings=True, **common)
    config.architectures = [{"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}.get(kind,
                                                                                               "Phi3ForCausalLM")]
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:  # Gemma's norms scale by 1 + weight, Phi-3's by weight
                param.copy_(0.2 * noise + (0.0 if kind.startswith("gemma") else 1.0))
            else:
                param.copy_(noise * (0.5 if "embed" in name else 1.5 / math.sqrt(param.shape[-1])))
    return model.eval()


def write_gguf(model: transformers.PreTrainedModel, kind: str, demo_dir: Path, path: Path,
               sentencepiece: bool = False) -> Path:
    """`model` as llama.cpp's converter writes it (F32 tensors), with the demo's byte-level vocabulary or
    (`sentencepiece`) the SentencePiece one of spm_vocabulary."""
    import gguf

    arch = kind.split("-")[0]
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    extra: dict[str, np.ndarray] = {}
    if arch == "gemma2":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
        writer.add_sliding_window(cfg.sliding_window)
    elif arch == "gemma3":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
        writer.add_sliding_window(cfg.sliding_window)
    else:
        rope = cfg.rope_parameters
        rotary = int(rope["partial_rotary_factor"] * cfg.hidden_size) // cfg.num_attention_heads
        writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        writer.add_rope_dimension_count(rotary)
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_sliding_window(cfg.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(
                cfg.original_max_position_embeddings)))
            extra = {"rope_factors_long.weight": np.array(rope["long_factor"], dtype=np.float32),
                     "rope_factors_short.weight": np.array(rope["short_factor"], dtype=np.float32)}
    if sentencepiece:
        add_spm_vocabulary(writer, arch)
    else:
        tokens, types, merges = tokenizer_metadata(demo_dir)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(cfg.bos_token_id)
        writer.add_eos_token_id(cfg.eos_token_id)
        writer.add_add_bos_token(True)
        if cfg.pad_token_id is not None:
            writer.add_pad_token_id(cfg.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            array = array + 1.0  # llama.cpp's Gemma converter stores norms as 1 + weight
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(array))
    for name, array in extra.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


KINDS = ("gemma2", "gemma3", "phi3", "phi3-longrope")


@pytest.fixture(scope="module")
def written(tmp_path_factory, gguf_demo_dir):
    """kind -> (reference model, GGUF path), written once for the module."""
    root = tmp_path_factory.mktemp("gguf-gemma-phi")
    out = {}
    for kind in KINDS:
        model = reference_model(kind)
        out[kind] = model, write_gguf(model, kind, Path(gguf_demo_dir), root / f"{kind}.gguf")
    return out


def transformers_gguf(path: Path, reference: transformers.PreTrainedModel, kind: str):
    """transformers' own GGUF loading of `path`, given the config fields it does not read from the file."""
    cfg = reference.config
    if kind == "gemma2":
        given = dict(query_pre_attn_scalar=cfg.query_pre_attn_scalar, attn_logit_softcapping=cfg.attn_logit_softcapping,
                     final_logit_softcapping=cfg.final_logit_softcapping)
    elif kind == "gemma3":
        given = dict(query_pre_attn_scalar=cfg.query_pre_attn_scalar)
    else:
        given = dict(sliding_window=cfg.sliding_window,
                     original_max_position_embeddings=cfg.original_max_position_embeddings)
        if cfg.pad_token_id is None:  # else Phi3Config's default, 32000, past the tiny vocabulary
            given["pad_token_id"] = None
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager", **given).eval()


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [[0] + torch.randint(5, VOCAB, (n,), generator=gen).tolist() for n in (40, 6)]


def approx(value):
    return pytest.approx(value, rel=1e-6) if isinstance(value, float) else value


def _field(config, name):
    if name == "layer_types":
        return list(config.layer_types)
    if name == "head_dim":  # Phi-3's config has none
        return getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return getattr(config, name)


@pytest.mark.parametrize("kind", KINDS)
def test_config_and_tensors_match_the_original_and_transformers(written, kind):
    reference, path = written[kind]
    checkpoint = read_gguf(path)
    ours = checkpoint.config
    assert ours["architectures"] == reference.config.architectures
    assert ours["model_type"] == reference.config.model_type
    # ours as a transformers config: every field the original sets, and what transformers' rope code reads
    as_hf = transformers.AutoConfig.for_model(**{k: v for k, v in ours.items() if k != "torch_dtype"})
    for name in FIELDS[kind]:  # GGUF stores floats as f32
        assert _field(as_hf, name) == approx(_field(reference.config, name)), name
    assert as_hf.rope_parameters == reference.config.rope_parameters
    if kind == "phi3-longrope":
        scaling = ours["rope_scaling"]
        assert scaling["rope_type"] == "longrope" and "attention_factor" not in scaling  # the derived one
        torch.testing.assert_close(torch.tensor(scaling["long_factor"]),
                                   torch.tensor(reference.config.rope_parameters["long_factor"]))

    tensors = dict(checkpoint.tensors())
    expected = {n: t for n, t in reference.state_dict().items()
                if not (n == "lm_head.weight" and reference.config.tie_word_embeddings)}
    assert set(tensors) == set(expected)
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)

    hf = transformers_gguf(path, reference, kind)
    assert hf.config.model_type == ours["model_type"]
    for name in TRANSFORMERS_READS:
        assert getattr(hf.config, name) == approx(ours[name]), name
    if kind.startswith("gemma"):
        assert hf.config.head_dim == ours["head_dim"] and hf.config.sliding_window == ours["sliding_window"]
    state = hf.state_dict()
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, state[name].float(), atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_a_conversion_loads_in_transformers_with_the_same_logits(written, kind, tmp_path):
    reference, path = written[kind]
    converted = convert_gguf(path, tmp_path / "converted")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(converted), dtype=torch.float32, attn_implementation="eager").eval()
    assert type(model) is type(reference)
    hf = None if kind == "phi3-longrope" else transformers_gguf(path, reference, kind)  # no LongRoPE from GGUF
    for ids in prompts():
        ours = logits(model, ids)
        torch.testing.assert_close(ours, logits(reference, ids), atol=1e-4, rtol=1e-4)
        if hf is not None:
            torch.testing.assert_close(ours, logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_a_phi3_gguf_with_one_rope_factor_tensor_is_refused(written, tmp_path):
    import gguf

    _, path = written["phi3-longrope"]
    reader = gguf.GGUFReader(str(path))
    broken = tmp_path / "broken.gguf"
    writer = gguf.GGUFWriter(str(broken), "phi3")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, kind)
    for t in reader.tensors:
        if t.name != "rope_factors_short.weight":
            writer.add_tensor(t.name, np.array(t.data).reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="rope_factors"):
        read_gguf(broken)



# SentencePiece vocabularies (tokenizer.ggml.model "llama": pieces with scores, byte-fallback tokens, no merges),
# laid out as Gemma's and Phi-3's files have them.
TEXTS = ["Hello  world\n\nThe quick brown fox.", " a leading space", "   three leading, two trailing  ",
         "tabs\tand\r\nCRLF lines\n", "", " ", "\n", "ünïcödé ñ, 漢字 and 🦙 byte fallback", "a" * 40 + " " + "ab" * 9,
         "<start_of_turn>user\nhi<end_of_turn>\n", "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>", "</s><s>x",
         "    indented code\n        deeper"]
LLAMA_TOKEN_TYPES = {"normal": 1, "unknown": 2, "control": 3, "user_defined": 4, "byte": 6}


def spm_pieces() -> list[str]:
    """SentencePiece-style pieces (U+2581 for a space) learned from the demo corpus, best first."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    corpus = (Path(__file__).parents[2] / "loraplex" / "models" / "demo_corpus.txt").read_text().splitlines()
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", "\u2581")
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    learner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, limit_alphabet=70, show_progress=False))
    vocab = learner.get_vocab()
    return sorted(vocab, key=vocab.get)


def spm_vocabulary(arch: str) -> tuple[list[str], list[float], list[int], dict[str, int]]:
    """(tokens, scores, types, special ids) as llama.cpp writes a Gemma or a Llama/Phi-3 SentencePiece vocab."""
    t = LLAMA_TOKEN_TYPES
    pieces = spm_pieces()
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    if arch.startswith("gemma"):  # Gemma: specials first, runs of spaces spelled with real spaces
        head = [("<pad>", t["control"]), ("<eos>", t["control"]), ("<bos>", t["control"]), ("<unk>", t["unknown"]),
                ("<mask>", t["user_defined"]), ("<start_of_turn>", t["control"]), ("<end_of_turn>", t["control"])]
        tail = [("\n", t["normal"]), ("\n\n", t["normal"]), ("  ", t["user_defined"]), ("    ", t["normal"]),
                ("\t", t["user_defined"])]
        entries = head + [(b, t["byte"]) for b in byte_tokens] + tail + [(p, t["normal"]) for p in pieces]
        special = {"bos": 2, "eos": 1, "unknown": 3, "padding": 0}
    else:  # Llama 2 / Phi-3: <unk> <s> </s>, the bytes, the pieces; Phi-3's chat tokens added after them
        head = [("<unk>", t["unknown"]), ("<s>", t["control"]), ("</s>", t["control"])]
        tail = [("<|endoftext|>", t["control"]), ("<|user|>", t["user_defined"]), ("<|end|>", t["control"]),
                ("<|assistant|>", t["user_defined"])]
        entries = head + [(b, t["byte"]) for b in byte_tokens] + [(p, t["normal"]) for p in pieces] + tail
        special = {"bos": 1, "eos": 2, "unknown": 0, "padding": len(head) + 256 + len(pieces)}
    tokens = [e[0] for e in entries]
    # scores tied in fours, so that merges also rank by their parts' lengths
    scores = [-float(i // 4) if kind == t["normal"] else 0.0 for i, (_, kind) in enumerate(entries)]
    if arch.startswith("gemma"):  # Gemma's scores do not follow its merge order (its file order does)
        scores = [s if i % 3 else -s for i, s in enumerate(scores)]
    return tokens, scores, [e[1] for e in entries], special


def add_spm_vocabulary(writer, arch: str) -> None:
    tokens, scores, types, special = spm_vocabulary(arch)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(special["bos"])
    writer.add_eos_token_id(special["eos"])
    writer.add_unk_token_id(special["unknown"])
    writer.add_pad_token_id(special["padding"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if arch.startswith("gemma"):
        writer.add_add_space_prefix(False)


def write_tokenizer_gguf(path: Path, arch: str, tokenizer: str, demo_dir: Path, extra=None) -> Path:
    """Model metadata (no tensors: a tokenizer's reader needs none) and a vocabulary: SentencePiece
    (`tokenizer`="llama") or the demo's byte-level BPE with the given tokenizer.ggml.pre; `extra(writer)` adds
    more metadata."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(96)
    writer.add_head_count(HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    if tokenizer == "llama":
        add_spm_vocabulary(writer, arch)
    else:
        tokens, types, merges = tokenizer_metadata(demo_dir)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
        writer.add_add_bos_token(False)
    if extra is not None:
        extra(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("arch", "tokenizer"), [("gemma2", "llama"), ("gemma3", "llama"), ("phi3", "llama"),
                                                 ("llama", "llama"), ("phi3", "gpt-4o")])
def test_the_tokenizer_gives_transformers_ids(gguf_demo_dir, tmp_path, arch, tokenizer):
    from loraplex.models.tokenizer import Tokenizer

    path = write_tokenizer_gguf(tmp_path / f"{arch}.gguf", arch, tokenizer, Path(gguf_demo_dir))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    checkpoint = read_gguf(path)
    ours = Tokenizer.from_path(path)
    saved = tmp_path / "tokenizer.json"
    checkpoint.tokenizer.save(str(saved))
    reloaded = transformers.PreTrainedTokenizerFast(tokenizer_file=str(saved))  # as `loraplex convert` writes it
    texts = TEXTS + ["I'LL pay 12345 DOLLARS, isn't it?\n\n  x", "theQuickBrownFox andThe HTTPServer's ./path/to"]
    for text in texts:
        expected = reference(text).input_ids
        assert ours.encode(text) == expected, text
        assert reloaded(text).input_ids == expected, text
        assert ours.decode(expected, skip_special_tokens=False) == reference.decode(expected), text
        if "<" in text:
            continue  # added tokens: SentencePiece prefixes the text after each with a space, on both sides
        joined = b"".join(ours.token_bytes(i) for i in expected if i != ours.bos_token_id).decode()
        # SentencePiece's prefix space, where Llama and Phi-3 add one (Gemma does not)
        assert joined == text or (arch in ("llama", "phi3") and tokenizer == "llama" and joined == " " + text), text
    assert checkpoint.tokenizer_config["bos_token"] == reference.bos_token
    assert checkpoint.tokenizer_config["eos_token"] == reference.eos_token
    ours_spec, reference_spec = (json.loads(t.to_str()) for t in (checkpoint.tokenizer, reference.backend_tokenizer))
    assert ours_spec["model"]["merges"] == reference_spec["model"]["merges"]  # in rank order
    if tokenizer == "llama":  # (transformers' GPT-2 class adds its own <|endoftext|> to a vocabulary without one)
        assert checkpoint.tokenizer.get_vocab() == reference.get_vocab()
    for text in texts:  # the text as BPE sees it
        assert _pieces(checkpoint.tokenizer, text) == _pieces(reference.backend_tokenizer, text), text


def _pieces(tokenizer, text: str) -> list[str]:
    if tokenizer.normalizer is not None:
        text = tokenizer.normalizer.normalize_str(text)
    if tokenizer.pre_tokenizer is None:  # Gemma's: transformers' splits at spaces the normalizer has replaced
        return [text] if text else []
    return [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text) if piece]


@pytest.mark.parametrize("kind", KINDS)
def test_the_engine_on_the_gguf_matches_transformers(written, kind):
    """Served from the GGUF file itself: greedy tokens and their logprobs as transformers' on the same file
    (Phi-3 with LongRoPE: as the original checkpoint, transformers reading no LongRoPE from a GGUF; its
    prompt is past the original context, where transformers too turns with the long factors)."""
    from loraplex import LLM, SamplingParams

    reference, path = written[kind]
    hf = reference if kind == "phi3-longrope" else transformers_gguf(path, reference, kind)
    batch = prompts()[:1] if kind == "phi3-longrope" else prompts()
    steps = 10
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True, logprobs=1)
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128, kv_cache_memory="16MiB")
    assert llm.engine.model.config.architecture == reference.config.architectures[0]
    for prompt, out in zip(batch, llm.generate(batch, params), strict=True):
        expected = logits(hf, prompt + out.token_ids).log_softmax(-1)[len(prompt) - 1:-1]
        assert out.token_ids == expected.argmax(-1).tolist(), "greedy tokens differ"
        ours = torch.tensor([lp.logprob for lp in out.logprobs])
        torch.testing.assert_close(ours, expected[torch.arange(steps), out.token_ids], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["gemma2", "phi3"])
def test_a_sentencepiece_gguf_served_from_text_matches_transformers(gguf_demo_dir, tmp_path, kind):
    """Text in, text out, on a GGUF with a SentencePiece vocabulary: the prompt's ids, the greedy tokens and
    the text as transformers' tokenizer and model on the same file give them."""
    from loraplex import LLM, SamplingParams

    tokens, _, _, special = spm_vocabulary(kind)
    model = reference_model(kind, vocab_size=len(tokens), bos_token_id=special["bos"], eos_token_id=special["eos"],
                            pad_token_id=special["padding"])
    path = write_gguf(model, kind, Path(gguf_demo_dir), tmp_path / f"{kind}.gguf", sentencepiece=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    hf = transformers_gguf(path, model, kind)
    texts = ["The quick brown fox", "  Two spaces, ünïcödé and 🦙\n\nthen a new paragraph"]
    steps = 8
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128, kv_cache_memory="16MiB")
    for text, out in zip(texts, llm.generate(texts, params), strict=True):
        assert out.prompt_token_ids == tokenizer(text).input_ids, text
        expected = logits(hf, out.prompt_token_ids + list(out.token_ids))[len(out.prompt_token_ids) - 1:-1]
        assert list(out.token_ids) == expected.argmax(-1).tolist(), text
        prompt_text = tokenizer.decode(out.prompt_token_ids, skip_special_tokens=True)
        whole = tokenizer.decode(out.prompt_token_ids + list(out.token_ids), skip_special_tokens=True)
        assert prompt_text + out.text == whole, text  # the continuation, with its leading space


@pytest.mark.parametrize(("arch", "layers", "scalar"), [("gemma2", 42, 256), ("gemma2", 46, 144), ("gemma3", 26, 256),
                                                        ("gemma3", 62, 168)])
def test_gemma_query_scaling_follows_llama_cpp(tmp_path, arch, layers, scalar):
    """The GGUF does not state query_pre_attn_scalar; llama.cpp takes head_dim, except for the 27B models
    (Gemma 2: 46 layers, 4608 / 32 heads = 144; Gemma 3: 62 layers, 5376 / 32 = 168), as their config.json."""
    import gguf

    big = layers in (46, 62)
    hidden = {"gemma2": 4608, "gemma3": 5376}[arch] if big else 3584
    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(8192)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(4 * hidden)
    writer.add_head_count(32 if big else 16)
    writer.add_head_count_kv(16)
    writer.add_key_length(128 if big else 256)
    writer.add_layer_norm_rms_eps(1e-6)
    if arch == "gemma3":  # a per-layer pattern, as newer files may state it (True: local)
        writer.add_sliding_window_pattern([i % 3 != 2 for i in range(layers)])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
    writer.add_token_scores([0.0, 0.0, 0.0, -1.0])
    writer.add_token_types([2, 3, 3, 1])
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = read_gguf(path).config
    assert config["query_pre_attn_scalar"] == scalar
    if arch == "gemma3":
        assert config["layer_types"] == ["full_attention" if i % 3 == 2 else "sliding_attention"
                                         for i in range(layers)]
        assert "sliding_window_pattern" not in config
    else:
        assert (config["attn_logit_softcapping"], config["final_logit_softcapping"]) == (50.0, 30.0)  # defaults


def test_end_of_turn_ids_stop_generation_as_eos(gguf_demo_dir, tmp_path):
    """A chat model's file names its end-of-turn token apart from EOS (tokenizer.ggml.eot_token_id: Gemma's
    <end_of_turn>, Phi-3's <|end|>): both end generation, as in llama.cpp."""
    from loraplex.models.gguf import read_gguf

    path = write_tokenizer_gguf(tmp_path / "eot.gguf", "gemma2", "llama", gguf_demo_dir,
                                extra=lambda writer: writer.add_eot_token_id(3))
    checkpoint = read_gguf(path)
    assert checkpoint.generation_config["eos_token_id"] == [1, 3]
    assert checkpoint.config["eos_token_id"] == [1, 3]
