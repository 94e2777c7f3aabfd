"""load_model on broken checkpoint directories: every error names what is wrong and where.

The checkpoints are built by hand with safetensors: one tiny Llama layer, tensor names as Hugging Face
writes them. A control test loads the intact checkpoint, so each failure below is the one injected.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraplex.kernels.backend import TorchBackend
from loraplex.models.loader import load_model
from loraplex.models.model_config import SUPPORTED_ARCHITECTURES

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def checkpoint_tensors(config: dict = CONFIG) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor] | None = None,
                     config: dict | None = None, filename: str = "model.safetensors") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(CONFIG if config is None else config)
    (directory / "config.json").write_text(json.dumps(config))
    tensors = checkpoint_tensors(config) if tensors is None else tensors
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / filename))
    return directory


def load(directory: Path):
    return load_model(directory, torch.float32, torch.device("cpu"), TorchBackend())


def test_intact_checkpoint_loads(tmp_path):
    tensors = checkpoint_tensors()
    model = load(write_checkpoint(tmp_path / "ok", tensors))
    attn = model.model.layers[1].self_attn
    qkv = attn.qkv_proj.weight
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    k = tensors["model.layers.1.self_attn.k_proj.weight"]
    v = tensors["model.layers.1.self_attn.v_proj.weight"]
    assert torch.equal(qkv, torch.cat([q, k, v]))
    gate_up = model.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(gate_up, torch.cat([tensors["model.layers.0.mlp.gate_proj.weight"],
                                           tensors["model.layers.0.mlp.up_proj.weight"]]))
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])


def test_intact_sharded_checkpoint_loads(tmp_path):
    directory = tmp_path / "sharded"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(CONFIG))
    tensors = checkpoint_tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(directory / shard))
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load(directory)
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"])


def test_directory_without_config_json(tmp_path):
    directory = write_checkpoint(tmp_path / "noconfig")
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json") as info:
        load(directory)
    assert str(directory) in str(info.value)


def test_config_json_that_is_not_json(tmp_path):
    directory = write_checkpoint(tmp_path / "badjson")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load(directory)


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    config = dict(CONFIG, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    directory = write_checkpoint(tmp_path / "gpt2", checkpoint_tensors(), config)
    with pytest.raises(ValueError) as info:
        load(directory)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    assert "not supported" in message
    for name in SUPPORTED_ARCHITECTURES:
        assert name in message
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(SUPPORTED_ARCHITECTURES)


def test_missing_architectures_field_falls_back_to_model_type_in_the_message(tmp_path):
    config = {k: v for k, v in CONFIG.items() if k != "architectures"}
    config["model_type"] = "gpt_neox"
    directory = write_checkpoint(tmp_path / "noarch", checkpoint_tensors(), config)
    with pytest.raises(ValueError, match="gpt_neox"):
        load(directory)


def test_missing_required_config_field_is_named(tmp_path):
    config = {k: v for k, v in CONFIG.items() if k != "intermediate_size"}
    directory = write_checkpoint(tmp_path / "nointer", checkpoint_tensors(), config)
    with pytest.raises(ValueError, match="intermediate_size"):
        load(directory)


def test_directory_without_safetensors(tmp_path):
    directory = tmp_path / "noweights"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors") as info:
        load(directory)
    assert str(directory) in str(info.value)


def test_only_pytorch_bin_says_how_to_convert(tmp_path):
    directory = tmp_path / "pickle"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(CONFIG))
    torch.save(checkpoint_tensors(), directory / "pytorch_model.bin")
    with pytest.raises(ValueError) as info:
        load(directory)
    message = str(info.value)
    assert "*.bin" in message or "pytorch_model.bin" in message
    assert "save_pretrained" in message and "safe_serialization=True" in message


def test_tensor_with_the_wrong_shape_names_file_tensor_and_expected_shape(tmp_path):
    tensors = checkpoint_tensors()
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(16, 20)  # expected (16, 24)
    directory = write_checkpoint(tmp_path / "shape", tensors, filename="model-00001-of-00001.safetensors")
    with pytest.raises(ValueError) as info:
        load(directory)
    message = str(info.value)
    assert "model-00001-of-00001.safetensors" in message
    assert "'model.layers.1.mlp.down_proj.weight'" in message
    assert "(16, 24)" in message and "(16, 20)" in message
    assert message.index("(16, 20)") < message.index("(16, 24)")  # found, then expected


def test_wrong_shape_of_a_fused_shard_reports_the_shard_shape(tmp_path):
    tensors = checkpoint_tensors()
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 16)  # one KV head: (8, 16)
    directory = write_checkpoint(tmp_path / "kshape", tensors)
    with pytest.raises(ValueError) as info:
        load(directory)
    message = str(info.value)
    assert "model.safetensors" in message and "'model.layers.0.self_attn.k_proj.weight'" in message
    assert "expected (8, 16)" in message


def test_missing_tensor_is_named(tmp_path):
    tensors = checkpoint_tensors()
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    directory = write_checkpoint(tmp_path / "missing", tensors)
    with pytest.raises(ValueError) as info:
        load(directory)
    message = str(info.value)
    assert "model.layers.1.self_attn.v_proj.weight" in message
    assert re.search(r"\b1 tensor", message)


def test_missing_lm_head_when_not_tied(tmp_path):
    tensors = checkpoint_tensors()
    del tensors["lm_head.weight"]
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        load(write_checkpoint(tmp_path / "nohead", tensors))


def test_tied_checkpoint_needs_no_lm_head_and_ignores_one(tmp_path):
    config = dict(CONFIG, tie_word_embeddings=True)
    tensors = checkpoint_tensors(config)
    assert "lm_head.weight" not in tensors
    model = load(write_checkpoint(tmp_path / "tied", tensors, config))
    assert model.lm_head is None
    tensors["lm_head.weight"] = torch.zeros(32, 16)  # some tied checkpoints still carry a copy
    load(write_checkpoint(tmp_path / "tied2", tensors, config))


@pytest.mark.parametrize(
    "extra",
    [
        "model.layers.2.mlp.down_proj.weight",  # a layer beyond num_hidden_layers
        "model.layers.0.self_attn.q_proj.bias",  # a bias the config does not have
        "model.layers.0.mlp.gate_proj.bias",
        "model.visual.proj.weight",  # part of another architecture
        "score.weight",
    ],
)
def test_unexpected_extra_tensor_is_named(tmp_path, extra):
    tensors = checkpoint_tensors()
    tensors[extra] = torch.zeros(16)
    directory = write_checkpoint(tmp_path / "extra", tensors)
    with pytest.raises(ValueError) as info:
        load(directory)
    message = str(info.value)
    assert f"unexpected tensor {extra!r}" in message
    assert "model.safetensors" in message


def test_rotary_inv_freq_is_ignored(tmp_path):
    """Old checkpoints carry rotary_emb.inv_freq buffers: loading skips them, and the rotary tables are
    computed from the config as for a checkpoint without them (zeros here would break every position)."""
    tensors = checkpoint_tensors()
    plain = load(write_checkpoint(tmp_path / "plain", tensors))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    with_buffer = load(write_checkpoint(tmp_path / "invfreq", tensors))
    assert torch.equal(with_buffer.model.rotary.cos_sin, plain.model.rotary.cos_sin)
    assert not any("inv_freq" in name for name, _ in with_buffer.named_parameters())
    for (name, a), (_, b) in zip(plain.state_dict().items(), with_buffer.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_index_pointing_at_a_missing_shard(tmp_path):
    directory = tmp_path / "badindex"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(CONFIG))
    tensors = checkpoint_tensors()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, str(directory / "model-00001-of-00002.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names[:5]}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in names[5:]})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError) as info:
        load(directory)
    message = str(info.value)
    assert "model-00002-of-00002.safetensors" in message
    assert "model.safetensors.index.json" in message


def test_malformed_index_json_names_the_file(tmp_path):
    directory = write_checkpoint(tmp_path / "brokenindex")
    (directory / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json"):
        load(directory)
