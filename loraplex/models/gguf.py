"""GGUF checkpoints (llama.cpp's format) read with the `gguf` package: config from the `<architecture>.*`
metadata (llama, qwen2, qwen3, gemma2, gemma3, phi3), tensors dequantized and renamed to Hugging Face names,
the tokenizer rebuilt with `tokenizers` from `tokenizer.ggml.*` (byte-level BPE, "gpt2"; SentencePiece BPE,
"llama", with merges derived from the pieces as transformers derives them, so the ids are transformers'), and
the chat template from `tokenizer.chat_template`.

What llama.cpp's convert_hf_to_gguf.py changes, undone here: llama's q/k rows (interleaved rotary halves),
Gemma's norm weights (stored as 1 + weight, Gemma's RMSNorm scaling by 1 + weight), Phi-3's LongRoPE factors
(stored as the tensors rope_factors_long/short, read back into rope_scaling). Gemma's pre/post norms get
their own names (ffn_norm is Gemma's pre_feedforward_layernorm, post_attention_norm its
post_attention_layernorm); Phi-3's fused attn_qkv and ffn_up stay fused (qkv_proj, gate_up_proj). What the
GGUF does not state, llama.cpp's runtime defaults supply: Gemma's query_pre_attn_scalar (head_dim, or
hidden / heads for the 27B models), Gemma 3's local rope base (10000) and sliding-window pattern (5 local
layers, then a global one)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

# GGUF architecture -> the Hugging Face architecture it is read as
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                           "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
_MODEL_TYPES = {"gemma3": "gemma3_text"}  # the Hugging Face model_type, where it is not the GGUF name
# llama.cpp's converter interleaves the rotary halves of q/k rows for these only (the others rotate halves
# as Hugging Face does, NeoX style)
_PERMUTED_QK = ("llama",)
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

# GGUF tensor name -> Hugging Face name ({i} is the layer).
_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",  # qwen2
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",  # qwen3
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}
# Per architecture, where its names differ from the table above (None: no counterpart).
_ARCH_TENSOR_NAMES: dict[str, dict[str, str | None]] = {
    "gemma": {
        "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
        "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
    },
    "phi3": {
        "blk.{i}.attn_qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
        "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",  # gate rows, then up rows
        "blk.{i}.ffn_gate.weight": None,
        "blk.{i}.attn_q.weight": None,  # llama.cpp always writes Phi-3's q/k/v fused
        "blk.{i}.attn_k.weight": None,
        "blk.{i}.attn_v.weight": None,
    },
}
_ARCH_TENSOR_NAMES["gemma2"] = _ARCH_TENSOR_NAMES["gemma3"] = _ARCH_TENSOR_NAMES["gemma"]
_GEMMA = ("gemma2", "gemma3")  # norm weights stored as 1 + weight
# Phi-3's LongRoPE factors: read into the config's rope_scaling, not model tensors
_ROPE_FACTORS = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")

# Text splits before byte-level BPE, by `tokenizer.ggml.pre` (llama.cpp's pre-tokenizer names).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tiktoken's o200k split (Phi-4-mini and other GPT-4o-style vocabularies): letters in case runs with English
# contractions attached, numbers of up to 3 digits
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_LETTERS = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
                  rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}")
_GPT4O_SPLIT = _GPT4O_LETTERS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _pre_tokenizer(name: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in (None, "default", "gpt2", "gpt-2"):
        return byte_level
    if name == "smollm":  # single digits, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
             "qwen2": _QWEN2_SPLIT, "gpt-4o": _GPT4O_SPLIT}.get(name)
    if split is None:
        raise ValueError(f"GGUF tokenizer.ggml.pre {name!r} is not supported (supported: gpt2, smollm, llama-bpe, "
                         "qwen2, gpt-4o)")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@dataclass
class GGUFCheckpoint:
    path: Path
    config: dict[str, Any]  # as a Hugging Face config.json
    tokenizer: HFTokenizer
    tokenizer_config: dict[str, Any]  # as tokenizer_config.json
    generation_config: dict[str, Any]  # as generation_config.json
    reader: Any  # gguf.GGUFReader
    architecture: str = "llama"  # the GGUF's general.architecture

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, fp32 tensor), dequantized one at a time."""
        heads, kv_heads = self.config["num_attention_heads"], self.config["num_key_value_heads"]
        permuted = self.architecture in _PERMUTED_QK
        for t in self.reader.tensors:
            if t.name in _ROPE_FACTORS and self.architecture == "phi3":
                continue  # in the config's rope_scaling
            name = hf_tensor_name(t.name, self.architecture)
            if name is None:
                raise ValueError(f"{self.path.name}: tensor {t.name!r} has no counterpart in a "
                                 f"{self.config['architectures'][0]}")
            weight = _weight(self.path, t)
            if permuted and name.endswith("q_proj.weight"):
                weight = unpermute_qk(weight, heads)
            elif permuted and name.endswith("k_proj.weight"):
                weight = unpermute_qk(weight, kv_heads)
            elif self.architecture in _GEMMA and t.name.endswith("norm.weight"):
                weight -= 1.0  # llama.cpp stores Gemma's norms as 1 + weight
            yield name, weight


def _weight(path: Path, tensor) -> torch.Tensor:
    weight = torch.from_numpy(np.array(_dequantize(path, tensor), dtype=np.float32))  # a writable copy
    return weight.reshape([int(d) for d in reversed(tensor.shape)])  # GGUF lists dims innermost first


def _dequantize(path: Path, tensor) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        return dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{path.name}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the gguf "
                         "package cannot dequantize") from None


def hf_tensor_name(gguf_name: str, architecture: str = "llama") -> str | None:
    names = _ARCH_TENSOR_NAMES.get(architecture, {})
    if gguf_name in names:
        return names[gguf_name]
    if gguf_name in _TENSOR_NAMES:
        return _TENSOR_NAMES[gguf_name]
    match = _BLOCK.match(gguf_name)
    if match is None:
        return None
    key = f"blk.{{i}}.{match.group(2)}"
    template = names[key] if key in names else _TENSOR_NAMES.get(key)
    return template.format(i=match.group(1)) if template else None


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order for q/k: it interleaves the two rotary halves of each head."""
    out_features = weight.shape[0]
    half = out_features // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    from gguf import GGUFReader

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            raise ValueError(f"{path}: expected exactly one .gguf file, found {len(files)}")
        path = files[0]
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path.name}: GGUF architecture {arch!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{path.name}: tensor 'rope_freqs.weight' (Llama 3.1 rope scaling) is not supported in "
                         "GGUF files yet; use the Hugging Face checkpoint")
    tokenizer, tokenizer_config, generation_config = _tokenizer(path, meta, arch)
    config = _config(path, meta, arch, tie="output.weight" not in tensor_names)
    if arch == "phi3":
        _phi3_rope(path, meta, reader, config)
    config.update(bos_token_id=generation_config.get("bos_token_id"), eos_token_id=generation_config["eos_token_id"])
    if arch in ("gemma2", "gemma3", "phi3"):  # stated even when absent: their config classes default to ids of
        config["pad_token_id"] = meta.get("tokenizer.ggml.padding_token_id")  # the full-size vocabularies
    return GGUFCheckpoint(path, config, tokenizer, tokenizer_config, generation_config, reader, arch)


def _metadata(reader) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - an exotic field type we do not need
            continue
    return meta


def _config(path: Path, meta: dict[str, Any], arch: str, tie: bool) -> dict[str, Any]:
    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise ValueError(f"{path.name}: metadata {arch}.{key} is missing")
        return meta[f"{arch}.{key}"]

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    heads = need("attention.head_count")
    hidden = need("embedding_length")
    if arch == "phi3":  # rope.dimension_count is the rotary width (partial rotary), not the head's
        head_dim = get("attention.key_length") or hidden // heads
    else:
        head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    config = {
        "architectures": [SUPPORTED_ARCHITECTURES[arch]], "model_type": _MODEL_TYPES.get(arch, arch),
        "hidden_size": hidden, "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads), "head_dim": head_dim,
        "vocab_size": get("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        "max_position_embeddings": need("context_length"),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),  # llama.cpp's default (its converter writes it)
        "tie_word_embeddings": tie, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32",
    }
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"{path.name}: {arch}.rope.scaling.type {scaling!r} is not supported")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    if arch in _GEMMA:
        del config["mlp_bias"]
        config.update(_gemma_config(path, meta, arch, config))
    elif arch == "phi3":
        del config["mlp_bias"], config["attention_bias"]
        rotary = get("rope.dimension_count") or head_dim
        window = get("attention.sliding_window") or None  # 0: none (Phi-4)
        config.update(partial_rotary_factor=rotary / head_dim, sliding_window=window,
                      original_max_position_embeddings=get("rope.scaling.original_context_length")
                      or config["max_position_embeddings"])
    return config


def _gemma_config(path: Path, meta: dict[str, Any], arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2/3's fields beyond Llama's, with llama.cpp's defaults (llama-model.cpp) for what the GGUF
    leaves out."""
    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    layers, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
    big = layers == (46 if arch == "gemma2" else 62)  # llama.cpp's 27B: scaled by hidden / heads, not head_dim
    extra = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
             "query_pre_attn_scalar": hidden // heads if big else config["head_dim"],
             "sliding_window": get("attention.sliding_window", 4096)}
    if arch == "gemma2":
        extra.update(attn_logit_softcapping=float(get("attn_logit_softcapping", 50.0)),
                     final_logit_softcapping=float(get("final_logit_softcapping", 30.0)))
        return extra
    softcap = get("final_logit_softcapping")
    extra.update(attn_logit_softcapping=None, final_logit_softcapping=None if softcap is None else float(softcap),
                 rope_local_base_freq=float(get("rope.freq_base_swa", 10000.0)))
    pattern = get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # one flag per layer: True where the layer is local (sliding)
        if len(pattern) != layers:
            raise ValueError(f"{path.name}: {arch}.attention.sliding_window_pattern has {len(pattern)} entries for "
                             f"{layers} layers")
        local = [bool(flag) for flag in pattern]
    else:
        pattern = int(pattern)
        local = [pattern <= 0 or (i + 1) % pattern != 0 for i in range(layers)]
        extra["sliding_window_pattern"] = pattern
    extra["layer_types"] = ["sliding_attention" if flag else "full_attention" for flag in local]
    return extra


def _phi3_rope(path: Path, meta: dict[str, Any], reader, config: dict[str, Any]) -> None:
    """Phi-3's LongRoPE: llama.cpp writes the per-dimension factors as tensors, the attention factor and the
    original context as metadata; read back into rope_scaling as Phi-3's config.json has it."""
    factors = {_ROPE_FACTORS[t.name]: _weight(path, t).reshape(-1).tolist()
               for t in reader.tensors if t.name in _ROPE_FACTORS}
    if not factors:
        return
    if len(factors) != 2:
        raise ValueError(f"{path.name}: has only one of rope_factors_long/rope_factors_short")
    original = config["original_max_position_embeddings"]
    scaling = {"rope_type": "longrope", "long_factor": factors["long_factor"],
               "short_factor": factors["short_factor"], "original_max_position_embeddings": original}
    attn_factor = meta.get("phi3.rope.scaling.attn_factor")
    scale = config["max_position_embeddings"] / original
    default = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    if attn_factor is not None and not math.isclose(float(attn_factor), default, rel_tol=1e-6):
        scaling["attention_factor"] = float(attn_factor)  # only where it is not the one Phi-3 derives itself
    config["rope_scaling"] = scaling


def _tokenizer(path: Path, meta: dict[str, Any], arch: str):
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"{path.name}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, "
                         "byte-level BPE; llama, SentencePiece BPE)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        vocab = {token: i for i, token in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        tok.decoder = decoders.ByteLevel()
        user_defined = [t for t, k in zip(tokens, types, strict=True) if k == _TOKEN_USER_DEFINED]
    else:
        tok, vocab = _sentencepiece(path, meta, arch, tokens)
        user_defined = [t for t, k in zip(tokens, types, strict=True) if k == _TOKEN_USER_DEFINED and t in vocab]
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True)
               if k == _TOKEN_CONTROL]
    tok.add_special_tokens(special)
    tok.add_tokens([AddedToken(t, normalized=False) for t in user_defined])

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and index < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    first = [bos] if add_bos and bos is not None else []
    last = [eos] if add_eos and eos is not None else []
    if first or last:
        ends = dict.fromkeys(first + last)
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*first, "$A", *last]), pair=" ".join([*first, "$A", *last, *first, "$B", *last]),
            special_tokens=[(t, tok.token_to_id(t)) for t in ends])
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "unk_token": token("unknown"), "pad_token": token("padding"), "add_bos_token": add_bos,
        "clean_up_tokenization_spaces": False, "model_max_length": meta.get(f"{arch}.context_length"),
    }
    if add_eos:
        tokenizer_config["add_eos_token"] = True
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    generation_config = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
                         "eos_token_id": _stop_ids(meta)}
    return tok, tokenizer_config, generation_config


def _stop_ids(meta: dict[str, Any]) -> int | list[int] | None:
    """The ids that end generation: EOS, and the end-of-turn / end-of-message tokens a chat model's file names
    apart (Gemma's <end_of_turn>, Phi-3's <|end|>), as llama.cpp stops at them."""
    ids = [meta.get(f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot", "eom")]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids[0] if len(ids) == 1 else ids or None


def _sentencepiece(path: Path, meta: dict[str, Any], arch: str, tokens: list[str]):
    """SentencePiece BPE (`tokenizer.ggml.model` "llama": pieces with scores, byte-fallback tokens <0xNN>, no
    merges), as transformers rebuilds it from a GGUF file, so that both give the same ids: merges derived from
    the pieces, best first; text to pieces by architecture (Gemma: spaces as U+2581, no prefix; Phi-3: the
    same with one U+2581 prepended; the others: SentencePiece's Metaspace, prefixed at the start of the text)."""
    gemma = arch in _GEMMA
    if gemma:
        # Gemma's files spell runs of spaces with real spaces where its pieces have U+2581; and its scores do
        # not follow its merge order, the order of the pieces in the file does
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        priority = {t: -float(i) for i, t in enumerate(tokens)}
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ValueError(f"{path.name}: a SentencePiece vocabulary (tokenizer.ggml.model 'llama') needs "
                             "tokenizer.ggml.scores, one per token")
        priority = {t: float(score) for t, score in zip(tokens, scores, strict=True)}
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=_merges_by_priority(vocab, priority), unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    to_space = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.decoder = decoders.Sequence(to_space)
        return tok, vocab
    if arch == "phi3":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([*to_space, decoders.Strip(content=" ", left=1, right=0)])
    return tok, vocab


def _merges_by_priority(vocab: dict[str, int], priority: dict[str, float]) -> list[tuple[str, str]]:
    """Every way to cut a piece in two known pieces, as a merge ranked by the piece's priority (then longer
    left part, then longer right part; then the pieces' order, and the parts' ids within a piece)."""
    ranked = []
    for order, (piece, score) in enumerate(priority.items()):
        cuts = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        cuts = sorted(((vocab[a], vocab[b]), a, b) for a, b in cuts if a in vocab and b in vocab)
        ranked += [((-score, -len(a), -len(b), order, ids), (a, b)) for ids, a, b in cuts]
    ranked.sort(key=lambda entry: entry[0])
    return [merge for _, merge in ranked]


def _expected_tensor_names(config: dict[str, Any]) -> set[str]:
    from loraplex.kernels.backend import TorchBackend
    from loraplex.models.loader import expected_tensor_names
    from loraplex.models.model_config import ModelConfig
    from loraplex.models.registry import model_class

    model_config = ModelConfig.from_dict(config)
    with torch.device("meta"):
        model = model_class(model_config)(model_config, TorchBackend(), torch.float32)
    return set(expected_tensor_names(model))


def convert_gguf(source: str | Path, output: str | Path, progress: bool = False) -> Path:
    """Write a Hugging Face checkpoint directory (fp32 safetensors) from a GGUF file."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    checkpoint = read_gguf(source)
    output = Path(output)
    if (output / "config.json").exists():
        raise FileExistsError(f"{output}: already holds a checkpoint (config.json); remove it or pick another dir")
    output.mkdir(parents=True, exist_ok=True)
    tensors = {}
    count = len(checkpoint.reader.tensors)
    for name, weight in tqdm(checkpoint.tensors(), total=count, desc="dequantizing", disable=not progress):
        tensors[name] = weight.contiguous()
    missing = sorted(_expected_tensor_names(checkpoint.config) - set(tensors))
    if missing:
        raise ValueError(f"{checkpoint.path.name}: lacks {len(missing)} tensor(s) a "
                         f"{checkpoint.config['architectures'][0]} with this metadata needs, "
                         f"e.g. {', '.join(missing[:3])}")
    save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
    (output / "model.safetensors").chmod(0o644)  # safetensors writes owner-only files
    checkpoint.tokenizer.save(str(output / "tokenizer.json"))
    files = {"tokenizer_config.json": checkpoint.tokenizer_config,
             "generation_config.json": checkpoint.generation_config, "config.json": checkpoint.config}
    for name, content in files.items():  # config.json last: its presence marks a complete checkpoint
        (output / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return output
