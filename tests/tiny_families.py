"""Tiny random configs of the Gemma 2, Gemma 3 and Phi-3 families for parity tests, each exercising what sets
the family apart: sliding windows shorter than the test prompts, soft-capping strong enough to bend scores and
logits, query_pre_attn_scalar unlike head_dim, Gemma 3's local RoPE base and scaled global RoPE, Phi-3's
partial rotary and LongRoPE with an original context (64) shorter than the long prompts."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
WEIGHT_STD = 0.2  # large enough that greedy argmaxes have clear margins

SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)
SLIDING_WINDOW = 24
PHI3_ORIGINAL_CONTEXT = 64
FAMILIES = ("gemma2", "gemma3", "phi3")


def family_config(name: str, vocab_size: int, special_ids: dict[str, int]):
    """(transformers config, model class) of the tiny `name` model."""
    import transformers

    common = dict(vocab_size=vocab_size, **SHAPE, **special_ids)
    if name == "gemma2":
        config = transformers.Gemma2Config(
            num_hidden_layers=3, head_dim=16, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=24,
            attn_logit_softcapping=3.0, final_logit_softcapping=8.0, **common)
        return config, transformers.Gemma2ForCausalLM
    if name == "gemma3":
        config = transformers.Gemma3TextConfig(
            num_hidden_layers=3, head_dim=16, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=20,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_theta=1000.0,
            rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0}, **common)
        return config, transformers.Gemma3ForCausalLM
    if name == "phi3":
        config = transformers.Phi3Config(
            num_hidden_layers=2, original_max_position_embeddings=PHI3_ORIGINAL_CONTEXT, partial_rotary_factor=0.5,
            rope_scaling={"rope_type": "longrope", "long_factor": [1.0, 3.5, 7.0, 12.0],
                          "short_factor": [1.0, 1.2, 1.5, 2.0]},
            tie_word_embeddings=False, **common)
        return config, transformers.Phi3ForCausalLM
    if name == "gemma3-multimodal":  # Gemma3ForConditionalGeneration: the text model above, and a vision tower
        text, _ = family_config("gemma3", vocab_size, special_ids)
        vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=32, patch_size=8)
        config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                           mm_tokens_per_image=4, **special_ids)
        return config, transformers.Gemma3ForConditionalGeneration
    raise ValueError(name)


def long_rope_everywhere(config) -> None:
    """Make a Phi-3 config use its long LongRoPE factors at every length (transformers uses the short ones up to
    the original context): the reference for an engine serving more than the original context."""
    params = config.rope_parameters
    params["short_factor"] = list(params["long_factor"])


def write_random_checkpoint(directory: Path, tokenizer_dir: Path, config, model_cls, seed: int) -> Path:
    """`model_cls(config)` with seeded random weights (norm weights around 1, so that a checkpoint's norm weights
    must really be applied), saved by transformers to `directory` with the tokenizer files of `tokenizer_dir`."""
    model = model_cls(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * WEIGHT_STD
            param.copy_(1.0 + noise if "norm" in name else noise)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / name, Path(directory) / name)
    return Path(directory)
