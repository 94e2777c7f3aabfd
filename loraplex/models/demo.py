"""A tiny, fully deterministic Llama checkpoint with a tokenizer and three LoRA adapters.

`write_demo_model(dir)` produces a Hugging Face style model directory (config, safetensors weights,
byte-level BPE tokenizer with a ChatML template, PEFT adapters) that loads with `transformers` and
`peft`, so tests, examples and benchmarks can run without downloading anything.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS_PATH = Path(__file__).with_name("demo_corpus.txt")

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
BOS_ID, EOS_ID, IM_START_ID, IM_END_ID, PAD_ID = range(len(SPECIAL_TOKENS))
VOCAB_SIZE = 2048  # includes the special tokens and the 256-byte alphabet

MODEL_SEED = 20240601
EMBED_STD = 0.5  # tied lm_head: logit std ~ sqrt(hidden) * EMBED_STD = 8; peaked, top-1 prob ~0.6
PROJ_GAIN = 1.5  # projection std = PROJ_GAIN / sqrt(fan_in): layers dominate the residual stream
ADAPTER_REL = 0.1  # LoRA delta rms ~ ADAPTER_REL * rms(input): logits move O(1), ~1/3 of argmaxes flip

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEMO_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": "float32",
}

DEMO_ADAPTERS: dict[str, dict[str, Any]] = {
    "alpha": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
    "beta": {"r": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "gamma": {"r": 16, "alpha": 16, "targets": ["gate_proj", "up_proj", "down_proj"]},
}

_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Projection name -> (out_features, in_features), as nn.Linear stores its weight."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    return {
        "q_proj": (q_dim, hidden),
        "k_proj": (kv_dim, hidden),
        "v_proj": (kv_dim, hidden),
        "o_proj": (hidden, q_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def _randn(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def base_weights(config: dict[str, Any], seed: int = MODEL_SEED) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM state dict minus the tied lm_head.weight; generation order is fixed."""
    gen = torch.Generator().manual_seed(seed)
    hidden = config["hidden_size"]
    weights = {"model.embed_tokens.weight": _randn((config["vocab_size"], hidden), EMBED_STD, gen)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        weights[prefix + "input_layernorm.weight"] = torch.ones(hidden)
        weights[prefix + "post_attention_layernorm.weight"] = torch.ones(hidden)
        for name, (out, inp) in linear_shapes(config).items():
            std = PROJ_GAIN / math.sqrt(inp)
            weights[f"{prefix}{_PARENT[name]}.{name}.weight"] = _randn((out, inp), std, gen)
    weights["model.norm.weight"] = torch.ones(hidden)
    return weights


def adapter_weights(
    config: dict[str, Any], r: int, alpha: float, targets: list[str], seed: int
) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA tensors: lora_A [r, in], lora_B [out, r]; both non-zero."""
    gen = torch.Generator().manual_seed(seed)
    shapes = linear_shapes(config)
    # A x has rms ~ rms(x) per rank row; scale * B (A x) then has rms ~ ADAPTER_REL * rms(x)
    b_std = ADAPTER_REL / ((alpha / r) * math.sqrt(r))
    weights: dict[str, torch.Tensor] = {}
    for i in range(config["num_hidden_layers"]):
        for name in targets:
            out, inp = shapes[name]
            key = f"base_model.model.model.layers.{i}.{_PARENT[name]}.{name}"
            weights[key + ".lora_A.weight"] = _randn((r, inp), 1.0 / math.sqrt(inp), gen)
            weights[key + ".lora_B.weight"] = _randn((out, r), b_std, gen)
    return weights


def _corpus_lines() -> Iterator[str]:
    with CORPUS_PATH.open(encoding="utf-8") as f:
        yield from f


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE trained on the shipped corpus; deterministic (merge ties break by pair id)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A",
        pair="<|bos|> $A <|bos|> $B:1",
        special_tokens=[("<|bos|>", BOS_ID)],
    )
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"demo tokenizer has {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    for i, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != i:
            raise RuntimeError(f"special token {token} got id {tok.token_to_id(token)}, expected {i}")
    return tok


def _tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }


def _generation_config() -> dict[str, Any]:
    return {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID], "pad_token_id": PAD_ID}


def _adapter_config(base_name: str, r: int, alpha: float, targets: list[str]) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _write_adapter(adir: Path, base_name: str, spec: dict[str, Any], seed: int) -> None:
    r, alpha, targets = spec["r"], spec["alpha"], spec["targets"]
    adir.mkdir(parents=True)
    tensors = adapter_weights(DEMO_CONFIG, r, alpha, targets, seed)
    save_file(tensors, str(adir / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(adir / "adapter_config.json", _adapter_config(base_name, r, alpha, targets))


def _write_files(out: Path, base_name: str, adapters: bool) -> None:
    """Everything into `out`; config.json last so its presence means the rest is complete."""
    save_file(base_weights(DEMO_CONFIG), str(out / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer().save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(DEMO_CONFIG))
    _write_json(out / "generation_config.json", _generation_config())
    if adapters:
        for index, (name, spec) in enumerate(DEMO_ADAPTERS.items()):
            _write_adapter(out / "adapters" / name, base_name, spec, seed=MODEL_SEED + 1 + index)
    _write_json(out / "config.json", DEMO_CONFIG)


def _exists_error(target: Path) -> FileExistsError:
    return FileExistsError(f"{target} already holds a model; remove it or pick another directory")


def _check_target(target: Path) -> None:
    if (target / "config.json").exists():
        raise _exists_error(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; remove it or pick another directory")


def _make_readable(root: Path) -> None:
    # mkdtemp and safetensors create owner-only entries; a model directory should be world-readable
    os.chmod(root, 0o755)
    for path in root.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _move_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    # existing directory without config.json: move entries in, config.json last
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
    if any((target / e.name).exists() for e in entries):
        raise _exists_error(target)
    for entry in entries:
        os.rename(entry, target / entry.name)
    tmp.rmdir()


def write_demo_model(directory: str | Path, *, adapters: bool = True) -> Path:
    """Write the demo model (and, by default, its adapters under adapters/<name>/) into `directory`.

    Files are written into a temporary sibling directory and renamed into place, so an interrupted
    write never leaves a directory with a config.json but missing weights.
    """
    target = Path(directory)
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        _write_files(tmp, target.resolve().name, adapters)
        _make_readable(tmp)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
