"""`loraplex merge` end to end: the directory it writes is a PEFT adapter that `peft` itself loads, whose
model equals the base model with the exact weighted sum of the inputs' updates (each taken from PEFT's own
`get_delta_weight`, so rslora and rank/alpha patterns are PEFT's); MWA on the demo checkpoints follows
the formula from their trainer states; bad invocations are clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_hf_base, lora_layers
from safetensors.torch import load_file

from loraplex.cli import main

DEMO_CHECKPOINTS = Path(__file__).parents[2] / "loraplex" / "demo_adapters" / "checkpoints"
TOKENS = [7, 19, 23, 101, 55, 42, 9, 250]


@torch.no_grad()
def base_plus(demo_dir: Path, adapters: list[tuple[Path, float]]):
    """The base model with Σ w_i ΔW_i added to its weights, each ΔW_i from PEFT's get_delta_weight."""
    from peft import PeftModel

    model = load_hf_base(demo_dir)
    for path, weight in adapters:
        peft_model = PeftModel.from_pretrained(load_hf_base(demo_dir), path)
        for name, layer in lora_layers(peft_model).items():
            model.get_submodule(name).weight += weight * layer.get_delta_weight("default")
    return model


@torch.no_grad()
def logits(model) -> torch.Tensor:
    ids = torch.tensor([TOKENS])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_the_written_adapter_loads_in_peft_and_adds_the_exact_weighted_sum(demo_dir, peft_adapters, tmp_path,
                                                                          method):
    from peft import PeftModel

    # mixed ranks, rank_pattern / alpha_pattern, rslora, different targets, a negative weight
    inputs = [(peft_adapters["pattern"], 0.7), (peft_adapters["rs"], -0.4)]
    out = tmp_path / "merged"
    extra = ["--rank", "64"] if method == "svd" else []  # svd at full rank: the exact sum too
    assert main(["merge", "--method", method, *[f"--adapter={p}:{w}" for p, w in inputs], "-o", str(out),
                 *extra]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and not config["use_rslora"]
    assert all(config["alpha_pattern"][k] == v for k, v in config["rank_pattern"].items())
    merged = PeftModel.from_pretrained(load_hf_base(demo_dir), out).eval()
    expected = logits(base_plus(demo_dir, inputs))
    assert not torch.allclose(expected, logits(load_hf_base(demo_dir)), atol=1e-2)  # the merge shows
    torch.testing.assert_close(logits(merged), expected, atol=2e-4, rtol=1e-4)
    recipe = json.loads((out / "merge_recipe.json").read_text())
    assert recipe["method"] == method and [i["weight"] for i in recipe["inputs"]] == [0.7, -0.4]
    assert all(len(i["sha256"]) == 64 for i in recipe["inputs"])


def test_mwa_of_the_demo_checkpoints_follows_the_formula_from_their_trainer_states(tmp_path):
    paths = [DEMO_CHECKPOINTS / f"pirate-step-{s}" for s in (10, 20, 30)]
    losses = []
    for path in paths:  # the last logged training loss, read here independently
        history = json.loads((path / "trainer_state.json").read_text())["log_history"]
        losses.append([e["loss"] for e in history if "loss" in e][-1])
    out = tmp_path / "mwa"
    assert main(["merge", "--method", "mwa", "--penalty", "2", *[f"--adapter={p}" for p in paths],
                 "-o", str(out)]) == 0
    m = torch.tensor([1 / loss for loss in losses], dtype=torch.float64) ** 2
    weights = (m / m.sum()).tolist()
    recipe = json.loads((out / "merge_recipe.json").read_text())
    assert [i["loss"] for i in recipe["inputs"]] == losses
    assert [i["mwa_weight"] for i in recipe["inputs"]] == pytest.approx(weights, rel=1e-9)
    got = load_file(str(out / "adapter_model.safetensors"))
    tensors = [load_file(str(p / "adapter_model.safetensors")) for p in paths]
    config = json.loads((paths[0] / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    for key in list(got)[:8]:
        # lora_B was written with the run's scale folded in (the output's scale is 1)
        factor = scale if ".lora_B." in key else 1.0
        expected = factor * sum(w * t[key].double() for w, t in zip(weights, tensors, strict=True))
        torch.testing.assert_close(got[key].double(), expected.to(got[key].dtype).double(), atol=2e-3, rtol=2e-3)


def test_bad_merges_are_clear_errors_and_write_nothing(tmp_path, capsys, peft_adapters):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", "--method", "cat", "--adapter", str(peft_adapters["q1"]), "-o", str(out)]) == 2
    assert "not an empty directory" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["merge", "--method", "ties", "--density", "0", "--adapter", str(peft_adapters["q1"]),
                 "-o", str(tmp_path / "x")]) == 2
    assert "density" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["merge", "--method", "mwa", "--adapter", str(peft_adapters["q1"]), "--adapter",
                 str(peft_adapters["q1"]), "-o", str(tmp_path / "y")]) == 2
    assert "metric_values" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(peft_adapters["q1"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/else"
    (other / "adapter_config.json").write_text(json.dumps(config))
    assert main(["merge", "--method", "cat", "--adapter", str(peft_adapters["q1"]), "--adapter", str(other),
                 "-o", str(tmp_path / "z")]) == 2
    assert "someone/else" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["cat", "svd", "ties", "dare_ties", "mwa", "copa"])
def test_a_merge_on_cuda_equals_the_same_merge_on_the_cpu(peft_adapters, method):
    from loraplex.adapters_store.formats import load_peft_lora
    from loraplex.arithmetic import MergeParams, delta, merge

    names = ("all32", "all32") if method in ("mwa", "copa") else ("pattern", "rs")  # mwa / copa: one shape
    adapters = [load_peft_lora(peft_adapters[n], n, None, 1 << 16) for n in names]
    params = MergeParams(method, density=0.5, rank=8, metric_values=(1.0, 2.0) if method == "mwa" else None)
    weights = None if method in ("mwa", "copa") else [0.7, -0.4]
    on_cpu = merge(adapters, weights, params, "m")
    on_cuda = merge(adapters, weights, params, "m", device="cuda")
    assert set(on_cuda.modules) == set(on_cpu.modules)
    for key, module in on_cuda.modules.items():
        assert module.a.device.type == "cuda"
        expected = delta(on_cpu.modules[key])
        if method == "dare_ties":  # another generator: the drop masks differ; the shape and finiteness hold
            assert torch.isfinite(module.a).all() and module.a.shape == on_cpu.modules[key].a.shape
            continue
        torch.testing.assert_close(delta(module).cpu(), expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-3)
