"""A model directory of a real model's shape with no weights, for `--load-format dummy` benchmarks.

    python benchmarks/shaped_model.py DIR                     # Llama-3-8B's shape, a rank-16 adapter
    python benchmarks/shaped_model.py DIR --shape tiny        # the same files for a small shape (tests)

Writes config.json (the shape), a word-level tokenizer with the model's full vocabulary (so every id
the random model samples detokenizes: `t<id>`; unknown words are one `<unk>` token each, so a prompt
of N words is N tokens), generation_config.json, and `adapters/r16`: one PEFT LoRA of rank 16 on
q_proj, k_proj, v_proj and o_proj with seeded random factors at a trained adapter's scale. The
model's weights are made by the engine (`--load-format dummy`), never written to disk.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

SHAPES = {
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
    },
    "tiny": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32",
    },
}
ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_tokenizer(out: Path, vocab_size: int) -> None:
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2} | {f"t{i}": i for i in range(3, vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True}, indent=2))


def write_adapter(out: Path, config: dict, rank: int = 16, seed: int = 1) -> None:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv = hidden // heads * config["num_key_value_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name in ADAPTER_TARGETS:
            rows, cols = shapes[name]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, cols, generator=g) / cols**0.5).to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(rows, rank, generator=g) * 0.01).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "shaped", "r": rank,
        "lora_alpha": 2 * rank, "target_modules": list(ADAPTER_TARGETS), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}, indent=2))


def write_shaped_model(out: Path, shape: str) -> Path:
    config = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, config["vocab_size"])
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    write_adapter(out / "adapters" / "r16", config)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    args = parser.parse_args()
    print(write_shaped_model(args.out, args.shape))


if __name__ == "__main__":
    main()
