"""GGUF checkpoints (llama.cpp's format) read with the `gguf` package: config from the `<architecture>.*`
metadata (llama, qwen2, qwen3), tensors dequantized and renamed to Hugging Face names, the tokenizer rebuilt with
`tokenizers` from `tokenizer.ggml.*`, and the chat template from `tokenizer.chat_template`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

# GGUF architecture -> the Hugging Face architecture it is read as
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
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
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")

# Text splits before byte-level BPE, by `tokenizer.ggml.pre` (llama.cpp's pre-tokenizer names).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(name: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in (None, "default", "gpt2", "gpt-2"):
        return byte_level
    if name == "smollm":  # single digits, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
             "qwen2": _QWEN2_SPLIT}.get(name)
    if split is None:
        raise ValueError(f"GGUF tokenizer.ggml.pre {name!r} is not supported (supported: gpt2, smollm, llama-bpe, "
                         "qwen2)")
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

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, fp32 tensor), dequantized one at a time."""
        heads, kv_heads = self.config["num_attention_heads"], self.config["num_key_value_heads"]
        permuted = self.config["model_type"] in _PERMUTED_QK
        for t in self.reader.tensors:
            name = hf_tensor_name(t.name)
            if name is None:
                raise ValueError(f"{self.path.name}: tensor {t.name!r} has no counterpart in a Llama model")
            weight = torch.from_numpy(np.array(_dequantize(self.path, t), dtype=np.float32))  # a writable copy
            weight = weight.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
            if permuted and name.endswith("q_proj.weight"):
                weight = unpermute_qk(weight, heads)
            elif permuted and name.endswith("k_proj.weight"):
                weight = unpermute_qk(weight, kv_heads)
            yield name, weight


def _dequantize(path: Path, tensor) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        return dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{path.name}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the gguf "
                         "package cannot dequantize") from None


def hf_tensor_name(gguf_name: str) -> str | None:
    if gguf_name in _TENSOR_NAMES:
        return _TENSOR_NAMES[gguf_name]
    match = _BLOCK.match(gguf_name)
    if match is None:
        return None
    template = _TENSOR_NAMES.get(f"blk.{{i}}.{match.group(2)}")
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
    config.update(bos_token_id=generation_config.get("bos_token_id"), eos_token_id=generation_config["eos_token_id"])
    return GGUFCheckpoint(path, config, tokenizer, tokenizer_config, generation_config, reader)


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
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    config = {
        "architectures": [SUPPORTED_ARCHITECTURES[arch]], "model_type": arch,
        "hidden_size": hidden, "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads), "head_dim": head_dim,
        "vocab_size": get("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        "max_position_embeddings": need("context_length"),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": tie, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32",
    }
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"{path.name}: {arch}.rope.scaling.type {scaling!r} is not supported")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    return config


def _tokenizer(path: Path, meta: dict[str, Any], arch: str):
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path.name}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, "
                         "byte-level BPE)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True)
               if k == _TOKEN_CONTROL]
    tok.add_special_tokens(special)
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types, strict=True)
                    if k == _TOKEN_USER_DEFINED])

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and index < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "unk_token": token("unknown"), "pad_token": token("padding"), "add_bos_token": add_bos,
        "clean_up_tokenization_spaces": False, "model_max_length": meta.get(f"{arch}.context_length"),
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    generation_config = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
                         "eos_token_id": meta.get("tokenizer.ggml.eos_token_id")}
    return tok, tokenizer_config, generation_config


def _expected_tensor_names(config: dict[str, Any]) -> set[str]:
    from loraplex.kernels.backend import TorchBackend
    from loraplex.models.llama import LlamaForCausalLM
    from loraplex.models.loader import expected_tensor_names
    from loraplex.models.model_config import ModelConfig

    with torch.device("meta"):
        model = LlamaForCausalLM(ModelConfig.from_dict(config), TorchBackend(), torch.float32)
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
        raise ValueError(f"{checkpoint.path.name}: lacks {len(missing)} tensor(s) a Llama with this metadata needs, "
                         f"e.g. {', '.join(missing[:3])}")
    save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
    (output / "model.safetensors").chmod(0o644)  # safetensors writes owner-only files
    checkpoint.tokenizer.save(str(output / "tokenizer.json"))
    files = {"tokenizer_config.json": checkpoint.tokenizer_config,
             "generation_config.json": checkpoint.generation_config, "config.json": checkpoint.config}
    for name, content in files.items():  # config.json last: its presence marks a complete checkpoint
        (output / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return output
