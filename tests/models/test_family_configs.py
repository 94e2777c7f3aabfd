"""ModelConfig for the Gemma 2/3 and Phi-3 families from config.json files as their checkpoints write them (the
parity suites use transformers-5 configs; published checkpoints carry older forms): defaults where a field is
left out, per-layer windows, LongRoPE's forms, and refusals naming the field."""

from __future__ import annotations

import math

import pytest
import transformers

from loraplex.models.model_config import GEMMA3_TEXT_DEFAULTS, ModelConfig

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=300, max_position_embeddings=512)


def test_gemma3_text_defaults_are_transformers_defaults():
    reference = transformers.Gemma3TextConfig()
    params = reference.rope_parameters
    expected = {**{key: getattr(reference, key) for key in GEMMA3_TEXT_DEFAULTS
                   if key not in ("rope_theta", "rope_local_base_freq")},
                "rope_theta": params["full_attention"]["rope_theta"],
                "rope_local_base_freq": params["sliding_attention"]["rope_theta"]}
    assert expected == GEMMA3_TEXT_DEFAULTS


def test_a_published_multimodal_gemma3_config_gives_its_text_model():
    """google/gemma-3-4b-it's config.json: text_config lists only what differs from the defaults (old form:
    rope_scaling, no layer_types), the token ids at the top."""
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024}, "vision_config": {"hidden_size": 1152}}
    config = ModelConfig.from_dict(raw)
    assert config.architecture == "Gemma3ForCausalLM" and config.text_of_multimodal
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (8, 4, 256, 262208)
    assert config.rope_theta == 1e6 and config.local_rope_theta == 1e4
    assert config.rope_scaling == {"factor": 8.0, "rope_type": "linear"}
    assert config.layer_windows == tuple(None if (i + 1) % 6 == 0 else 1024 for i in range(34))
    assert config.eos_token_ids == (1, 106) and config.tie_word_embeddings
    assert config.attention_scale == 256**-0.5 and config.final_softcap is None and config.attn_softcap is None


def test_gemma2_without_layer_types_alternates_from_a_sliding_first_layer():
    raw = {"architectures": ["Gemma2ForCausalLM"], **SHAPE, "sliding_window": 16, "head_dim": 16}
    config = ModelConfig.from_dict(raw)
    assert config.layer_windows == (16, None, 16, None)
    assert (config.attn_softcap, config.final_softcap) == (50.0, 30.0)  # transformers' Gemma 2 defaults
    assert config.hidden_act == "gelu_pytorch_tanh"  # transformers' Gemma default, with no hidden_activation given
    hf = transformers.Gemma2Config(**{k: v for k, v in raw.items() if k != "architectures"})
    assert config.layer_windows == tuple(16 if t == "sliding_attention" else None for t in hf.layer_types)


def test_qwen2_slides_from_max_window_layers_on():
    raw = {"architectures": ["Qwen2ForCausalLM"], **SHAPE, "sliding_window": 16, "use_sliding_window": True,
           "max_window_layers": 2}
    hf = transformers.Qwen2Config(**{k: v for k, v in raw.items() if k != "architectures"})
    expected = tuple(16 if t == "sliding_attention" else None for t in hf.layer_types)
    assert ModelConfig.from_dict(raw).layer_windows == expected == (None, None, 16, 16)
    assert ModelConfig.from_dict({**raw, "use_sliding_window": False}).layer_windows == ()


@pytest.mark.parametrize("rope_type", ["su", "longrope"])
def test_phi3_longrope_in_its_published_forms(rope_type):
    """Phi-3-mini-128k's config (rope_scaling type "su", original context at the top), Phi-4-mini's (longrope,
    partial_rotary_factor 0.75): the attention factor is transformers' sqrt(1 + ln(s) / ln(original))."""
    raw = {"architectures": ["Phi3ForCausalLM"], **SHAPE, "max_position_embeddings": 131072,
           "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75, "sliding_window": 262144,
           "rope_scaling": {"type": rope_type, "long_factor": [2.0] * 6, "short_factor": [1.0] * 6}}
    config = ModelConfig.from_dict(raw)
    assert config.rope_scaling["rope_type"] == "longrope" and config.rotary_dim == 12
    assert config.rope_scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert config.layer_windows == (262144,) * 4 and config.fused_checkpoint


@pytest.mark.parametrize(("change", "message"), [
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8}}, "needs long_factor"),
    ({"rope_scaling": {"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8},
      "original_max_position_embeddings": None}, "needs original_max_position_embeddings"),
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention", "full_attention"],
      "sliding_window": 8}, "layer_types holds 'chunked_attention'"),
    ({"partial_rotary_factor": 0.1}, "partial_rotary_factor"),
])
def test_bad_family_configs_are_refused_by_name(change, message):
    raw = {"architectures": ["Phi3ForCausalLM"], **SHAPE, "original_max_position_embeddings": 64, **change}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(raw)


def test_gemma3_without_a_window_still_turns_its_sliding_layers_with_the_local_rope():
    """transformers' Gemma 3 with sliding_window null keeps its layer types, and their RoPE: the sliding kind of
    layer attends globally then, yet turns with the local base."""
    import torch

    from loraplex.kernels.backend import TorchBackend
    from loraplex.models.registry import model_class

    raw = {"architectures": ["Gemma3ForCausalLM"], **SHAPE, "head_dim": 16, "num_hidden_layers": 6,
           "sliding_window": None}
    config = ModelConfig.from_dict(raw)
    hf = transformers.Gemma3TextConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    assert config.sliding_layers == tuple(t == "sliding_attention" for t in hf.layer_types)
    assert config.layer_windows == () and config.local_rope_theta == hf.rope_parameters["sliding_attention"][
        "rope_theta"]
    with torch.device("meta"):
        model = model_class(config)(config, TorchBackend(), torch.float32)
    assert [layer.local for layer in model.model.layers] == [True] * 5 + [False]
    assert all(layer.self_attn.window is None for layer in model.model.layers)


def test_longrope_factors_of_the_wrong_length_are_refused_at_once():
    raw = {"architectures": ["Phi3ForCausalLM"], **SHAPE, "original_max_position_embeddings": 64,
           "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 7}}
    with pytest.raises(ValueError, match="short_factor has 7 entries; 16 rotary dims need 8"):
        ModelConfig.from_dict(raw)


def test_random_gemma_weights_have_unit_norm_gains(tmp_path):
    """--load-format dummy on a Gemma config: the norms' stored w is 0 (Gemma scales by 1 + w), so the random
    model's gains are 1 as for the other families, and its logits stay finite."""
    import json

    import torch

    from loraplex.models.loader import load_model

    raw = {"architectures": ["Gemma2ForCausalLM"], **SHAPE, "head_dim": 16, "sliding_window": 8}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model = load_model(tmp_path, torch.float32, torch.device("cpu"), "torch", load_format="dummy")
    norms = [p for name, p in model.named_parameters() if name.endswith("norm.weight")]
    assert norms and all(bool((p == 0).all()) for p in norms)
    assert torch.isfinite(model.compute_logits(torch.randn(3, 64))).all()
