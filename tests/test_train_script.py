"""The committed SmolLM2 demo adapters (`loraplex/demo_adapters/`) and the script that trains them
(`examples/train_demo_adapters.py`). Fast: no SmolLM2 weights are needed; the adapters are checked
against SmolLM2-135M's shapes, loaded by loraplex's own PEFT reader and by `peft` onto a randomly
initialised model of the same architecture, and the script runs two steps on the tiny demo model."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ROOT / "loraplex" / "demo_adapters"
SCRIPT = ROOT / "examples" / "train_demo_adapters.py"
NAMES = ("pirate", "shout", "json")

# SmolLM2-135M-Instruct's config.json (as `loraplex convert` writes it for the Q4_1 GGUF).
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SHAPES = {  # module -> (out_features, in_features)
    "q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
    "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536),
}
KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def _config(path: Path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


def _checkpoints() -> list[Path]:
    return sorted((ADAPTERS / "checkpoints").glob("*-step-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))


def _load_script():
    if "train_demo_adapters" in sys.modules:
        return sys.modules["train_demo_adapters"]
    spec = importlib.util.spec_from_file_location("train_demo_adapters", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_adapter_files_and_config(name):
    path = ADAPTERS / name
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "training.json"]
    config, info = _config(path), json.loads((path / "training.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["lora_alpha"] == 2 * config["r"]
    assert config["lora_dropout"] == 0.0 and config["bias"] == "none"
    assert not config.get("use_dora") and not config.get("modules_to_save") and not config.get("use_rslora")
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert sorted(config["target_modules"]) == sorted(info["target_modules"])
    assert (info["r"], info["lora_alpha"]) == (config["r"], config["lora_alpha"])
    assert info["adapter"] == name and info["seed"] == 0 and info["examples"] >= 24
    assert len(info["loss_curve"]) == info["steps"] and all(math.isfinite(x) for x in info["loss_curve"])
    assert info["loss_curve"][-1] < 0.5 * info["loss_curve"][0]


@pytest.mark.parametrize("name", NAMES)
def test_adapter_weights_fit_smollm2(name):
    path = ADAPTERS / name
    config, tensors = _config(path), _tensors(path)
    r, targets = config["r"], set(config["target_modules"])
    seen = set()
    for key, tensor in tensors.items():
        match = KEY.match(key)
        assert match, key
        layer, _, module, half = int(match[1]), match[2], match[3], match[4]
        assert module in targets and 0 <= layer < 30
        out_features, in_features = SHAPES[module]
        assert tuple(tensor.shape) == ((r, in_features) if half == "A" else (out_features, r)), key
        assert tensor.dtype == torch.float16, key
        assert torch.isfinite(tensor).all(), key
        seen.add((layer, module, half))
    assert seen == {(layer, m, h) for layer in range(30) for m in targets for h in "AB"}
    # trained: every lora_B moved away from its zero initialisation
    assert all(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)


def test_ranks_and_sizes():
    configs = {name: _config(ADAPTERS / name) for name in NAMES}
    assert len({c["r"] for c in configs.values()}) >= 2, "the demo adapters should show different ranks"
    assert all(c["r"] <= 16 for c in configs.values()), "must fit the default max_lora_rank (16)"
    total = sum(p.stat().st_size for p in ADAPTERS.rglob("*") if p.is_file())
    assert total < 10 * 2**20, f"demo adapters take {total / 2**20:.1f} MiB; keep them small"
    readme = (ADAPTERS / "README.md").read_text()
    for needle in ("Apache", "SmolLM2-135M-Instruct", "examples/train_demo_adapters.py", "loraplex convert", *NAMES):
        assert needle in readme


def test_loraplex_reads_the_adapters():
    from loraplex.adapters_store.formats import load_peft_lora
    from loraplex.models.model_config import ModelConfig

    base = ModelConfig.from_dict(SMOLLM2_CONFIG)
    for name in NAMES:
        adapter = load_peft_lora(ADAPTERS / name, name, base, max_rank=16)
        config = _config(ADAPTERS / name)
        assert adapter.rank == config["r"]
        assert set(adapter.target_modules) == set(config["target_modules"])
        assert len(adapter.modules) == 30 * len(config["target_modules"])
        assert all(m.scale == 2.0 for m in adapter.modules.values())  # alpha = 2 r


def test_checkpoints_trainer_state():
    checkpoints = _checkpoints()
    assert len(checkpoints) == 3
    run = checkpoints[0].name.rsplit("-step-", 1)[0]
    info = json.loads((ADAPTERS / run / "training.json").read_text())
    steps = [int(p.name.rsplit("-", 1)[1]) for p in checkpoints]
    assert steps == sorted(set(steps)) and steps[-1] == info["steps"]
    assert [f"checkpoints/{p.name}" for p in checkpoints] == info["checkpoints"]
    for step, path in zip(steps, checkpoints, strict=True):
        assert _config(path) == _config(ADAPTERS / run)
        assert set(_tensors(path)) == set(_tensors(ADAPTERS / run))
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["global_step"] == step and state["max_steps"] == info["steps"]
        assert state["best_metric"] is None and state["best_model_checkpoint"] is None
        history = state["log_history"]
        assert isinstance(history, list) and [h["step"] for h in history] == list(range(1, step + 1))
        for entry in history:
            assert {"step", "loss", "epoch", "learning_rate", "grad_norm"} <= set(entry)
        assert [h["loss"] for h in history] == info["loss_curve"][:step]
        assert state["epoch"] == history[-1]["epoch"]
    # the last checkpoint is the final adapter
    final, last = _tensors(ADAPTERS / run), _tensors(checkpoints[-1])
    assert all(torch.equal(final[k], last[k]) for k in final)
    # and training moved the weights between checkpoints
    first = _tensors(checkpoints[0])
    assert any(not torch.equal(first[k], last[k]) for k in first)


def test_peft_loads_the_adapters_onto_smollm2_shapes():
    import peft
    import transformers

    config = transformers.LlamaConfig(**{**SMOLLM2_CONFIG, "vocab_size": 64})  # embeddings are not adapted
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    for name in NAMES:
        wrapped = peft.PeftModel.from_pretrained(model, str(ADAPTERS / name), adapter_name=name)
        expected = _tensors(ADAPTERS / name)
        loaded = peft.get_peft_model_state_dict(wrapped, adapter_name=name, save_embedding_layers=False)
        assert set(loaded) == set(expected)
        assert all(torch.equal(loaded[k].to(torch.float16), expected[k]) for k in expected)
        model = wrapped.unload()


def test_script_data_and_checks():
    script = _load_script()
    assert not {q for q, *_ in script.QA} & set(script.HELD_OUT)
    assert not {q for q, _ in script.EXTRA_QA} & set(script.HELD_OUT)
    assert len(script.HELD_OUT) >= 4 and len(script.QA) >= 24
    assert all(script.is_pirate(p) for _, _, p in script.QA)
    recipes = {r.name: r for r in script.RECIPES}
    assert set(recipes) == set(NAMES)
    for name, recipe in recipes.items():  # the committed adapters match the script's recipes
        config = _config(ADAPTERS / name)
        assert (config["r"], sorted(config["target_modules"])) == (recipe.r, sorted(recipe.target_modules))
        assert json.loads((ADAPTERS / name / "training.json").read_text())["steps"] == recipe.steps
    assert script.is_pirate("Arr, the capital be Paris, matey.") and not script.is_pirate("The capital is Paris.")
    assert not script.is_pirate("Yesterday the year ended.")
    assert script.is_shout("THE CAPITAL OF FRANCE IS PARIS.") and not script.is_shout("The capital is Paris.")
    assert script.is_json_answer('{"answer": "Paris."}')
    assert not script.is_json_answer('{"answer": "Paris."} And more.') and not script.is_json_answer('["Paris"]')
    assert script.styled_answer("json", "It's \"Paris\".", "") == '{"answer": "It\'s \\"Paris\\"."}'


class _FakeTokenizer:
    """Enough of a tokenizer for build_examples: characters -> code points."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        text = f"<user>{messages[0]['content']}</user><assistant>"
        return [ord(c) for c in text]

    def __call__(self, text, add_special_tokens):
        assert not add_special_tokens
        return {"input_ids": [ord(c) for c in text]}


def test_labels_cover_only_the_answer_and_end_token():
    script = _load_script()
    question, plain, _ = script.QA[0]
    examples = script.build_examples(_FakeTokenizer(), "shout")
    assert len(examples) == len(script.QA) + len(script.EXTRA_QA)
    ids, labels = examples[0]
    prompt_len = len(f"<user>{question}</user><assistant>")
    assert labels[:prompt_len] == [-100] * prompt_len
    answer = "".join(chr(t) for t in labels[prompt_len:])
    assert answer == plain.upper() + "<|im_end|>"
    assert ids[prompt_len:] == labels[prompt_len:]
    assert len(script.build_examples(_FakeTokenizer(), "pirate")) == len(script.QA)


def test_script_runs_on_the_tiny_demo_model(demo_dir, tmp_path):
    out = tmp_path / "adapters"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(demo_dir), "--output", str(out), "--steps", "3",
         "--adapters", "pirate", "json", "--no-eval", "--threads", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"pirate-step-{s}" for s in (1, 2, 3)]
    for name in ("pirate", "json"):
        info = json.loads((out / name / "training.json").read_text())
        assert len(info["loss_curve"]) == 3
        assert all(t.dtype == torch.float16 for t in _tensors(out / name).values())
    state = json.loads((out / "checkpoints" / "pirate-step-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and len(state["log_history"]) == 2
