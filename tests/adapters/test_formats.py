"""PEFT adapter directories: what loads (and as PEFT reads it), and what is refused, with a LoraplexError
whose field names the file at fault and whose message names the problem.

Adapters are made by PEFT itself where PEFT can make them (conftest.py), otherwise by editing a saved
adapter the way a broken or foreign file would differ. Expected ranks, target modules and scales come
from the LoRA layers of `PeftModel.from_pretrained(base, adapter)`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from loraplex import LLM
from loraplex.adapters_store.formats import load_peft_lora
from loraplex.engine.sampling import SamplingParams
from loraplex.errors import ErrorKind, LoraplexError
from loraplex.models.model_config import ModelConfig

MAX_RANK = 16
DEMO_ADAPTER_NAMES = ("alpha", "beta", "gamma")
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
KEY = "base_model.model.model.layers.{layer}.self_attn.{module}.lora_{half}.weight"


@pytest.fixture(scope="module")
def base_config(demo_dir) -> ModelConfig:
    return ModelConfig.from_file(Path(demo_dir) / "config.json")


@pytest.fixture(scope="module")
def load(base_config):
    def load(path: Path, max_rank: int = MAX_RANK, name: str = "test"):
        return load_peft_lora(Path(path), name, base_config, max_rank)

    return load


@pytest.fixture
def copy_demo_adapter(demo_dir, tmp_path):
    """`copy_demo_adapter(name)` -> a private copy of a demo adapter directory, free to break."""

    def copy(name: str = "alpha", dest: str | None = None) -> Path:
        target = tmp_path / (dest or f"{name}-copy")
        shutil.copytree(Path(demo_dir) / "adapters" / name, target)
        return target

    return copy


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / CONFIG).read_text())
    config.update(changes)
    (path / CONFIG).write_text(json.dumps(config))


def edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})


def refusal(load, path: Path, field: str, max_rank: int = MAX_RANK) -> str:
    """The message that refuses the adapter, checked to come from a LoraplexError naming the file at
    fault (`files` when one is missing) as its field."""
    with pytest.raises(LoraplexError) as info:
        load(path, max_rank)
    assert info.value.kind is ErrorKind.INVALID and info.value.field == field, info.value
    return str(info.value)


def tiny_llama(**overrides):
    """A random transformers Llama shaped like the demo model except for `overrides`."""
    demo = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, head_dim=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**demo, **overrides})).eval()


# -- what loads, as PEFT reads it -------------------------------------------------------------------


def peft_view(demo_dir: Path, adapter_dir: Path, lora_layers) -> dict[tuple[int, str], tuple[int, float, torch.Tensor,
                                                                                          torch.Tensor]]:
    """(layer, module) -> (rank, scaling, A, B) of every LoRA layer PEFT makes when it loads the adapter."""
    base = transformers.AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir)
    view = {}
    for name, layer in lora_layers(model).items():
        parts = name.split(".")
        assert parts[:2] == ["model", "layers"], name
        view[(int(parts[2]), parts[-1])] = (
            layer.r["default"],
            layer.scaling["default"],
            layer.lora_A["default"].weight.detach(),
            layer.lora_B["default"].weight.detach(),
        )
    return view


def assert_loads_as_peft(load, demo_dir, adapter_dir, peft_lora_layers, max_rank: int = 32):
    adapter = load(adapter_dir, max_rank=max_rank)
    expected = peft_view(Path(demo_dir), Path(adapter_dir), peft_lora_layers)
    assert set(adapter.modules) == set(expected), "LoRA modules differ from those PEFT makes"
    for key, (rank, scaling, a, b) in expected.items():
        module = adapter.modules[key]
        assert module.rank == rank, f"{key}: rank"
        assert module.scale == pytest.approx(scaling, rel=1e-6), f"{key}: scale"
        torch.testing.assert_close(module.a.float(), a.float(), rtol=0, atol=0, msg=f"{key}: lora_A")
        torch.testing.assert_close(module.b.float(), b.float(), rtol=0, atol=0, msg=f"{key}: lora_B")
    assert adapter.rank == max(rank for rank, *_ in expected.values())
    assert adapter.target_modules == sorted({module for _, module in expected},
                                            key=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"].index)
    return adapter


@pytest.mark.parametrize("name", DEMO_ADAPTER_NAMES)
def test_demo_adapters_load_as_peft_reads_them(demo_dir, load, peft_lora_layers, name):
    adapter = assert_loads_as_peft(load, demo_dir, Path(demo_dir) / "adapters" / name, peft_lora_layers)
    config = json.loads((Path(demo_dir) / "adapters" / name / CONFIG).read_text())
    assert adapter.rank == config["r"]
    assert adapter.target_modules == [m for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj") if m in config["target_modules"]]
    assert {m.scale for m in adapter.modules.values()} == {config["lora_alpha"] / config["r"]}
    assert {layer for layer, _ in adapter.modules} == {0, 1, 2, 3}


@pytest.mark.parametrize("name", ["q1", "all32", "pattern", "rs", "layers13", "regex"])
def test_peft_made_adapters_load_as_peft_reads_them(demo_dir, load, peft_adapters, peft_lora_layers, name):
    assert_loads_as_peft(load, demo_dir, peft_adapters[name], peft_lora_layers)


def test_rank_and_alpha_patterns_apply_per_module(demo_dir, load, peft_adapters, peft_lora_layers):
    """rank_pattern / alpha_pattern as PEFT applies them (the first key matching the end of the module name),
    with scale alpha / r, and alpha / sqrt(r) under rsLoRA; checked against PEFT's own layers too."""
    pattern = load(peft_adapters["pattern"], max_rank=32).modules
    for layer in range(4):
        assert (pattern[(layer, "v_proj")].rank, pattern[(layer, "v_proj")].scale) == (4, 16 / 4)
        assert (pattern[(layer, "o_proj")].rank, pattern[(layer, "o_proj")].scale) == (8, 32 / 8)
        assert (pattern[(layer, "down_proj")].rank, pattern[(layer, "down_proj")].scale) == (8, 16 / 8)
        q_rank = 2 if layer == 2 else 8
        assert (pattern[(layer, "q_proj")].rank, pattern[(layer, "q_proj")].scale) == (q_rank, 16 / q_rank)

    rs = load(peft_adapters["rs"], max_rank=32).modules
    for layer in range(4):
        assert rs[(layer, "k_proj")].scale == pytest.approx(32 / math.sqrt(16))
        assert rs[(layer, "o_proj")].scale == pytest.approx(8 / math.sqrt(16))
        assert (rs[(layer, "gate_proj")].rank, rs[(layer, "gate_proj")].scale) == (4, pytest.approx(8 / math.sqrt(4)))
        assert (rs[(layer, "up_proj")].rank, rs[(layer, "up_proj")].scale) == (16, pytest.approx(8 / 4))

    base = transformers.AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, peft_adapters["rs"])
    layers = model.base_model.model.model.layers
    for i in range(4):
        assert rs[(i, "k_proj")].scale == pytest.approx(layers[i].self_attn.k_proj.scaling["default"])
        assert rs[(i, "o_proj")].scale == pytest.approx(layers[i].self_attn.o_proj.scaling["default"])
        assert rs[(i, "gate_proj")].scale == pytest.approx(layers[i].mlp.gate_proj.scaling["default"])


def test_layers_to_transform_and_regex_targets(load, peft_adapters):
    layers13 = load(peft_adapters["layers13"]).modules
    assert {layer for layer, _ in layers13} == {1, 3}
    regex = load(peft_adapters["regex"]).modules
    assert set(regex) == {(i, m) for i in (0, 2) for m in ("q_proj", "v_proj", "gate_proj")}


def test_all_linear_targets_every_projection(load, peft_adapters):
    adapter = load(peft_adapters["all32"], max_rank=32)
    assert adapter.rank == 32
    assert adapter.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert len(adapter.modules) == 4 * 7


def test_single_layer_index_as_an_int(demo_dir, load, tmp_path, make_peft_adapter, peft_lora_layers):
    """PEFT accepts layers_to_transform as one int."""
    path = make_peft_adapter(tmp_path / "one-layer", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          layers_to_transform=2))
    assert json.loads((path / CONFIG).read_text())["layers_to_transform"] == 2
    adapter = assert_loads_as_peft(load, demo_dir, path, peft_lora_layers)
    assert set(adapter.modules) == {(2, "q_proj"), (2, "v_proj")}


def test_empty_layers_to_transform_means_every_layer(demo_dir, load, tmp_path, make_peft_adapter, peft_lora_layers):
    """PEFT treats `layers_to_transform: []` like None (every layer gets the LoRA, and its weights are saved):
    the adapter is valid and must load with all four layers."""
    path = make_peft_adapter(tmp_path / "empty-ltt", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                          layers_to_transform=[]))
    assert json.loads((path / CONFIG).read_text())["layers_to_transform"] == []
    adapter = assert_loads_as_peft(load, demo_dir, path, peft_lora_layers)
    assert {layer for layer, _ in adapter.modules} == {0, 1, 2, 3}


def test_rank_equal_to_max_lora_rank_loads(load, peft_adapters):
    assert load(peft_adapters["all32"], max_rank=32).rank == 32


def test_half_precision_weights_load_as_fp32(load, copy_demo_adapter):
    path = copy_demo_adapter("beta")
    original = load(path)

    def to_bf16(tensors):
        for key in tensors:
            tensors[key] = tensors[key].to(torch.bfloat16)

    edit_tensors(path, to_bf16)
    adapter = load(path)
    for key, module in adapter.modules.items():
        assert module.a.dtype == torch.float32 and module.scale == original.modules[key].scale
        torch.testing.assert_close(module.a, original.modules[key].a.to(torch.bfloat16).float(), rtol=0, atol=0)


# -- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lora_kwargs", "pattern"),
    [
        (dict(modules_to_save=["lm_head"]), r"modules_to_save"),
        (dict(bias="all"), r"bias 'all'"),
        (dict(bias="lora_only"), r"bias 'lora_only'"),
        (dict(trainable_token_indices=[10, 11]), r"embed"),
    ],
    ids=["modules_to_save", "bias_all", "bias_lora_only", "trainable_tokens"],
)
def test_unsupported_peft_features_are_refused(load, tmp_path, make_peft_adapter, lora_kwargs, pattern):
    path = make_peft_adapter(tmp_path / "adapter", dict(r=4, lora_alpha=8, target_modules=["q_proj"], **lora_kwargs))
    message = refusal(load, path, CONFIG)
    assert re.search(pattern, message), message


def test_lora_bias_is_refused_naming_lora_bias(load, tmp_path, make_peft_adapter):
    path = make_peft_adapter(tmp_path / "lora-bias", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                          lora_bias=True))
    message = refusal(load, path, CONFIG)
    assert "lora_bias" in message, message
    # the adapter's bias is 'none', which is supported: the message must not call it the problem
    assert "bias 'none' /" not in message, f"self-contradictory message: {message}"


def test_lora_on_embeddings_is_refused(load, tmp_path, make_peft_adapter):
    path = make_peft_adapter(tmp_path / "embed", dict(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    message = refusal(load, path, WEIGHTS)
    assert "embed" in message and "not supported" in message, message


def test_pickle_only_adapter_is_refused_with_how_to_convert(load, tmp_path, make_peft_adapter):
    path = make_peft_adapter(tmp_path / "bin", dict(r=4, lora_alpha=8, target_modules=["q_proj"]))
    # what save_pretrained(safe_serialization=False) writes
    torch.save(load_file(str(path / WEIGHTS)), path / "adapter_model.bin")
    (path / WEIGHTS).unlink()
    message = refusal(load, path, "files")
    assert "adapter_model.bin" in message and "adapter_model.safetensors" in message, message
    assert "save_file" in message and "convert" in message, message


def test_rank_above_max_lora_rank_is_refused(load, peft_adapters):
    message = refusal(load, peft_adapters["all32"], WEIGHTS, max_rank=16)
    assert "32" in message and "--max-lora-rank" in message, message


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("half", ["A", "B"])
def test_non_finite_weights_are_refused(load, copy_demo_adapter, half, value):
    path = copy_demo_adapter("alpha")
    key = KEY.format(layer=2, module="v_proj", half=half)

    def poison(tensors):
        tensors[key][1, 0] = value

    edit_tensors(path, poison)
    message = refusal(load, path, WEIGHTS)
    assert f"lora_{half}" in message and "NaN or infinite" in message and "layers.2" in message, message


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (dict(hidden_size=128, head_dim=16), r"another base model"),
        (dict(num_hidden_layers=6), r"layer 4 does not exist.*4 layers"),
        (dict(intermediate_size=512), r"another base model"),
    ],
    ids=["hidden_size", "more_layers", "intermediate_size"],
)
def test_adapter_for_another_base_model_is_refused(load, tmp_path, make_peft_adapter, overrides, pattern):
    path = make_peft_adapter(tmp_path / "other", dict(r=4, lora_alpha=8, target_modules="all-linear"),
                             base=tiny_llama(**overrides))
    message = refusal(load, path, WEIGHTS)
    assert re.search(pattern, message), message


def test_adapter_for_another_architecture_is_refused(load, tmp_path, make_peft_adapter):
    """A GPT-2 adapter: its module names (c_attn, ...) are not this model's."""
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=2048)
    path = make_peft_adapter(tmp_path / "gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                     fan_in_fan_out=True),
                             base=transformers.GPT2LMHeadModel(config))
    message = refusal(load, path, WEIGHTS)
    assert "unexpected tensor" in message or "another" in message, message


def _replace(key: str, make):
    def edit(tensors):
        tensors[key] = make(tensors[key])

    return edit


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        # lora_A [r, in] / lora_B [out, r] stored transposed
        (_replace(KEY.format(layer=1, module="q_proj", half="A"), lambda t: t.T.contiguous()), r"do not fit"),
        (_replace(KEY.format(layer=1, module="q_proj", half="B"), lambda t: t[:-1].contiguous()), r"do not fit"),
        # the two halves disagree on the rank
        (_replace(KEY.format(layer=1, module="q_proj", half="B"), lambda t: t[:, :-1].contiguous()), r"do not fit"),
        # both halves consistent, but not the rank adapter_config.json gives
        (lambda ts: ts.update({k: (v[:2] if "lora_A" in k else v[:, :2]).contiguous() for k, v in ts.items()
                               if "layers.0.self_attn.v_proj" in k}), r"rank 2 differs"),
        (_replace(KEY.format(layer=1, module="q_proj", half="A"), lambda t: t.unsqueeze(0)), r"matrices"),
        (_replace(KEY.format(layer=1, module="q_proj", half="A"), lambda t: t.to(torch.int32)), r"floating"),
    ],
    ids=["transposed", "wrong_out_features", "rank_mismatch", "rank_vs_config", "3d", "integer"],
)
def test_wrong_shapes_are_refused(load, copy_demo_adapter, edit, pattern):
    path = copy_demo_adapter("alpha")
    edit_tensors(path, edit)
    message = refusal(load, path, WEIGHTS)
    assert re.search(pattern, message), message


@pytest.mark.parametrize("missing", ["A", "B"])
def test_missing_half_is_refused(load, copy_demo_adapter, missing):
    path = copy_demo_adapter("alpha")
    key = KEY.format(layer=3, module="q_proj", half=missing)
    edit_tensors(path, lambda tensors: tensors.pop(key))
    message = refusal(load, path, WEIGHTS)
    other = "A" if missing == "B" else "B"
    assert "layers.3.self_attn.q_proj" in message and f"lora_{other}" in message, message
    assert "other half" in message, message


def test_no_lora_tensors_is_refused(load, copy_demo_adapter):
    path = copy_demo_adapter("alpha")
    save_file({}, str(path / WEIGHTS))
    assert "no LoRA weights" in refusal(load, path, WEIGHTS)


@pytest.mark.parametrize(
    ("peft_config", "peft_type"),
    [
        (lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                feedforward_modules=["down_proj"]), "IA3"),
        (lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj"]), "LOHA"),
    ],
    ids=["ia3", "loha"],
)
def test_other_peft_types_are_refused(demo_dir, load, tmp_path, peft_config, peft_type):
    base = transformers.AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft_config())
    model.save_pretrained(tmp_path / "other-type")
    message = refusal(load, tmp_path / "other-type", CONFIG)
    assert "peft_type" in message and peft_type in message, message


def test_missing_peft_type_means_lora(load, copy_demo_adapter):
    path = copy_demo_adapter("alpha")
    config = json.loads((path / CONFIG).read_text())
    del config["peft_type"]
    (path / CONFIG).write_text(json.dumps(config))
    assert load(path).rank == 4


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: b"\x00\x13not a safetensors file at all" * 10,
        lambda data: data[: len(data) // 2],  # truncated: the header promises more bytes than there are
        lambda data: data[:8] + b"{garbage json header" + data[28:],
        lambda data: b"",
    ],
    ids=["random_bytes", "truncated", "bad_header", "empty"],
)
def test_corrupt_safetensors_is_refused(load, copy_demo_adapter, corrupt):
    path = copy_demo_adapter("alpha")
    (path / WEIGHTS).write_bytes(corrupt((path / WEIGHTS).read_bytes()))
    message = refusal(load, path, WEIGHTS)
    assert WEIGHTS in message and "safetensors" in message, message


def test_missing_adapter_config_is_refused(load, copy_demo_adapter):
    path = copy_demo_adapter("alpha")
    (path / CONFIG).unlink()
    message = refusal(load, path, "files")
    assert CONFIG in message and "missing" in message, message


def test_missing_weights_file_is_refused(load, copy_demo_adapter):
    path = copy_demo_adapter("alpha")
    (path / WEIGHTS).unlink()
    message = refusal(load, path, "files")
    assert WEIGHTS in message and "missing" in message, message


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_invalid_adapter_config_is_refused(load, copy_demo_adapter, text):
    path = copy_demo_adapter("alpha")
    (path / CONFIG).write_text(text)
    message = refusal(load, path, CONFIG)
    assert CONFIG in message, message


@pytest.mark.parametrize(("key", "value"), [("r", 0), ("r", "4"), ("lora_alpha", None), ("lora_alpha", -1)])
def test_bad_rank_or_alpha_in_config_is_refused(load, copy_demo_adapter, key, value):
    path = copy_demo_adapter("alpha")
    edit_config(path, **{key: value})
    message = refusal(load, path, CONFIG)
    assert key in message, message


def test_layers_to_transform_inconsistent_with_weights_is_refused(load, copy_demo_adapter):
    path = copy_demo_adapter("alpha")  # weights for all four layers
    edit_config(path, layers_to_transform=[1, 3])
    message = refusal(load, path, WEIGHTS)
    assert "layers_to_transform" in message and "layer 0" in message, message


def test_refused_adapter_is_not_registered(demo_dir, copy_demo_adapter, peft_adapters):
    """Through the engine: add_adapter raises the same ValueError and leaves the registry as it was."""
    llm = LLM(model=str(demo_dir), adapters={"alpha": str(Path(demo_dir) / "adapters" / "alpha")}, dtype="float32",
              device="cpu", max_model_len=64, kv_cache_memory="16MiB", max_lora_rank=MAX_RANK)
    with pytest.raises(ValueError, match="--max-lora-rank"):
        llm.engine.add_adapter("big", peft_adapters["all32"])
    broken = copy_demo_adapter("beta")
    (broken / CONFIG).unlink()
    with pytest.raises(ValueError, match=CONFIG):
        llm.engine.add_adapter("broken", broken)
    assert llm.engine.adapter_names() == ["alpha"]
    with pytest.raises(ValueError, match="big"):
        llm.generate([[10, 11, 12]], SamplingParams(max_tokens=2), adapter="big")
    with pytest.raises(ValueError, match="max_loras|--max-lora-rank"):
        LLM(model=str(demo_dir), adapters={"big": str(peft_adapters["all32"])}, dtype="float32", device="cpu",
            max_model_len=64, kv_cache_memory="16MiB", max_lora_rank=MAX_RANK)


def test_unknown_adapter_in_generate_names_the_registered_adapters(demo_dir):
    adapters = {name: str(Path(demo_dir) / "adapters" / name) for name in ("alpha", "gamma")}
    llm = LLM(model=str(demo_dir), adapters=adapters, dtype="float32", device="cpu", max_model_len=64,
              kv_cache_memory="16MiB")
    params = SamplingParams(max_tokens=2, temperature=0)
    with pytest.raises(ValueError) as info:
        llm.generate([[10, 11, 12], [13, 14]], params, adapter=["alpha", "delta"])
    message = str(info.value)
    assert "'delta'" in message and "alpha" in message and "gamma" in message, message
    # the request queued before the bad one was withdrawn: the engine is idle and still serves
    assert not llm.engine.has_unfinished_requests()
    [out] = llm.generate([[10, 11, 12]], params, adapter="gamma")
    assert len(out.token_ids) == 2


# -- hostile or clumsy adapters: refused with a LoraplexError, never accepted, raised or hung ---------


@pytest.mark.parametrize(
    ("changes", "label"),
    [
        (dict(lora_alpha=float("inf")), "lora_alpha"),
        (dict(lora_alpha=float("nan")), "lora_alpha"),
        (dict(lora_alpha=1e30), "lora_alpha"),
        (dict(lora_alpha=True), "lora_alpha"),
        (dict(r=True), "r"),
        (dict(r=4.5), "r"),
        (dict(r=10**30), "r"),
        (dict(alpha_pattern={"o_proj": float("inf")}), 'alpha_pattern["o_proj"]'),
        (dict(alpha_pattern={"o_proj": float("nan")}), 'alpha_pattern["o_proj"]'),
        (dict(alpha_pattern={"o_proj": -1e30}), 'alpha_pattern["o_proj"]'),
        (dict(alpha_pattern={"o_proj": True}), 'alpha_pattern["o_proj"]'),
        (dict(rank_pattern={"v_proj": float("inf")}), 'rank_pattern["v_proj"]'),
        (dict(rank_pattern={"v_proj": True}), 'rank_pattern["v_proj"]'),
        (dict(use_rslora="false"), "use_rslora"),
    ],
    ids=["alpha_inf", "alpha_nan", "alpha_huge", "alpha_bool", "r_bool", "r_fraction", "r_huge", "alpha_pattern_inf",
         "alpha_pattern_nan", "alpha_pattern_huge_negative", "alpha_pattern_bool", "rank_pattern_inf",
         "rank_pattern_bool", "rslora_string"],
)
def test_bad_numbers_in_config_are_refused_naming_the_key(load, copy_demo_adapter, changes, label):
    """JSON's Infinity / NaN parse in Python, a bool is an int there, and a huge alpha is finite: each would
    reach the weights (one NaN-producing adapter poisons the KV cache other requests read)."""
    path = copy_demo_adapter("alpha")
    edit_config(path, **changes)
    message = refusal(load, path, CONFIG)
    assert f"{label} must be" in message, message


@pytest.mark.parametrize(
    ("factors", "tensor"),
    [
        ((1.0, 1e30), "lora_B"),  # finite weights, absurd update
        ((1e3, 1e3), "lora_B @ lora_A"),  # each half within bounds, their product not
        ((1e20, 1e-20), "lora_A"),  # the update is as trained, but lora_A overflows fp16 slots
        ((1e-20, 1e20), "lora_B"),
    ],
    ids=["b_1e30", "both_1e3", "a_huge_b_tiny", "a_tiny_b_huge"],
)
def test_absurd_weight_magnitudes_are_refused(load, copy_demo_adapter, factors, tensor):
    path = copy_demo_adapter("alpha")
    key_a, key_b = (KEY.format(layer=1, module="q_proj", half=half) for half in "AB")

    def scale(tensors):
        tensors[key_a] = tensors[key_a] * factors[0]
        tensors[key_b] = tensors[key_b] * factors[1]

    edit_tensors(path, scale)
    message = refusal(load, path, WEIGHTS)
    assert "layers.1.self_attn.q_proj" in message and tensor in message and "norm" in message, message


def test_catastrophic_pattern_loads_in_bounded_time(demo_dir, copy_demo_adapter):
    """`(.|.)*z` backtracks 2^len(name) steps in Python's re on a name without a z (it froze the server);
    RE2 matches in linear time. The load runs in a child process, since a regex match holds the GIL: its
    60 s limit only catches the hang (the child takes seconds, mostly importing torch)."""
    path = copy_demo_adapter("alpha")
    edit_config(path, alpha_pattern={"(.|.)*z": 64}, rank_pattern={"(.|.)*z": 2})
    code = ("import sys; from pathlib import Path; from loraplex.adapters_store.formats import load_peft_lora; "
            "from loraplex.models.model_config import ModelConfig; "
            "base = ModelConfig.from_file(Path(sys.argv[1]) / 'config.json'); "
            "print(sorted({m.scale for m in load_peft_lora(Path(sys.argv[2]), 't', base, 16).modules.values()}))")
    child = subprocess.run([sys.executable, "-c", code, str(demo_dir), str(path)], capture_output=True, text=True,
                           timeout=60)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["[2.0]"]  # nothing matched: alpha 8 / r 4 everywhere


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        ({r"(o)\1_proj": 32}, r"RE2"),  # a backreference
        ({r"(?<!self_attn\.)o_proj": 32}, r"RE2"),  # lookbehind
        ({"a" * 300 + "|o_proj": 32}, r"longer than"),
        ({f"layers\\.{i}\\.self_attn\\.o_proj": 32 for i in range(2000)}, r"entries"),
    ],
    ids=["backreference", "lookbehind", "long_key", "too_many_entries"],
)
def test_unsupported_or_oversized_patterns_are_refused(load, copy_demo_adapter, patterns, expected):
    path = copy_demo_adapter("alpha")
    edit_config(path, alpha_pattern=patterns)
    message = refusal(load, path, CONFIG)
    assert "alpha_pattern" in message and re.search(expected, message), message


@pytest.mark.parametrize("value", ["1", ["1"], [True], True, [1.0], {"1": 1}, [-1], [0, 1, 2, 3, 99], -1])
def test_malformed_layers_to_transform_is_refused(load, copy_demo_adapter, value):
    path = copy_demo_adapter("alpha")  # weights for all four layers
    edit_config(path, layers_to_transform=value)
    message = refusal(load, path, CONFIG)
    assert "layers_to_transform" in message, message


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"peft_type": "LORA", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}",
     '{"r": ' + "9" * 5000 + "}"],
    ids=["deep_array", "deep_inside_object", "int_of_5000_digits"],
)
def test_config_json_python_cannot_parse_is_refused(load, copy_demo_adapter, text):
    path = copy_demo_adapter("alpha")
    (path / CONFIG).write_text(text)
    message = refusal(load, path, CONFIG)
    assert "JSON" in message, message


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.bool])
def test_unsupported_weight_dtypes_are_refused(load, copy_demo_adapter, dtype):
    path = copy_demo_adapter("alpha")
    edit_tensors(path, _replace(KEY.format(layer=2, module="v_proj", half="A"), lambda t: t.to(dtype)))
    message = refusal(load, path, WEIGHTS)
    assert "layers.2.self_attn.v_proj" in message and str(dtype).removeprefix("torch.") in message, message
    assert "float32" in message, message


@pytest.mark.parametrize(
    ("changes", "label"),
    [(dict(rank_pattern=["v_proj"]), "rank_pattern"), (dict(alpha_pattern="o_proj"), "alpha_pattern"),
     (dict(r=None), "r"), (dict(lora_alpha=[8]), "lora_alpha"), (dict(use_rslora=1), "use_rslora")],
    ids=["rank_pattern_list", "alpha_pattern_string", "r_null", "alpha_list", "rslora_int"],
)
def test_config_values_of_the_wrong_type_are_refused(load, copy_demo_adapter, changes, label):
    path = copy_demo_adapter("alpha")
    edit_config(path, **changes)
    message = refusal(load, path, CONFIG)
    assert label in message, message
