"""DoRA adapters (PEFT `use_dora`) served against PEFT itself: greedy tokens and fp32 logprobs, in batches
that mix them with plain LoRA adapters and base-model requests, also through two slots (evicted and
refilled mid-run); plus the loader's checks of the magnitude vectors, and merges refusing DoRA inputs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import load_hf_base, lora_layers, randomize_lora
from safetensors.torch import load_file, save_file
from test_peft_parity import (
    TARGETS,
    assert_logprobs_match,
    assert_tokens_match,
    greedy,
    make_llm,
    make_requests,
)

from loraplex.adapters_store.formats import load_peft_lora
from loraplex.arithmetic import MergeParams, merge
from loraplex.errors import LoraplexError

DORA = {
    "dora": (dict(r=8, lora_alpha=16, target_modules="all-linear"), 401),
    "dora-rs": (dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 16}), 402),
}


def build_dora(demo_dir: Path, out: Path, kwargs: dict, seed: int) -> Path:
    """A DoRA adapter made by PEFT, its A, B and magnitudes all moved off their initial values (PEFT starts
    the magnitude at the row norms of W, and B at zero)."""
    import peft

    model = peft.get_peft_model(load_hf_base(demo_dir),
                                peft.LoraConfig(task_type="CAUSAL_LM", use_dora=True, lora_dropout=0.0, **kwargs))
    randomize_lora(model, seed, rel=0.15)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.mul_(0.7 + 0.6 * torch.rand(magnitude.shape, generator=gen))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dora_adapters(demo_dir, tmp_path_factory, peft_reference) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dora")
    made = {name: build_dora(demo_dir, root / name, kwargs, seed) for name, (kwargs, seed) in DORA.items()}
    for name, path in made.items():
        peft_reference.add(name, path)
    return made


PLAN = [("dora", 30), (None, 9), ("q1", 0), ("dora-rs", 17), ("rs", 42), ("dora", 0), ("dora-rs", 5),
        ("pattern", 25), (None, 0), ("dora", 11)]


@pytest.mark.parametrize("target", TARGETS)
def test_dora_in_a_mixed_batch_matches_peft(demo_dir, peft_adapters, dora_adapters, peft_reference, target):
    adapters_used = {**dora_adapters, **{n: peft_adapters[n] for n in ("q1", "rs", "pattern")}}
    prompts, adapters = make_requests(21, PLAN)
    max_new = target[2]
    llm = make_llm(demo_dir, adapters_used, target)
    outputs = llm.generate(prompts, greedy(max_new), adapter=adapters)
    assert_tokens_match(peft_reference, prompts, adapters, outputs, max_new=max_new)
    assert_logprobs_match(peft_reference, prompts, adapters, outputs, max_new)


def test_dora_through_two_slots_matches_peft(demo_dir, peft_adapters, dora_adapters, peft_reference):
    adapters_used = {**dora_adapters, **{n: peft_adapters[n] for n in ("q1", "rs")}}
    names = list(adapters_used)
    rng = random.Random(5)
    plan = [(names[i % 4] if i % 3 else None, rng.randrange(1, 40)) for i in range(12)]
    prompts, adapters = make_requests(22, plan)
    llm = make_llm(demo_dir, adapters_used, max_loras=2, max_cpu_adapters=2)
    outputs = llm.generate(prompts, greedy(12), adapter=adapters)
    assert llm.engine.adapters.slots.evictions > 0
    assert_tokens_match(peft_reference, prompts, adapters, outputs, max_new=12)
    assert_logprobs_match(peft_reference, prompts, adapters, outputs, 12)


def test_dora_changes_the_output_beyond_its_lora_part(demo_dir, dora_adapters, peft_reference, tmp_path):
    """The same A and B without the magnitude (a plain LoRA) answer differently: the factor is applied."""
    plain = tmp_path / "plain"
    plain.mkdir()
    tensors = load_file(str(dora_adapters["dora"] / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, str(plain / "adapter_model.safetensors"))
    config = (dora_adapters["dora"] / "adapter_config.json").read_text().replace('"use_dora": true',
                                                                                '"use_dora": false')
    (plain / "adapter_config.json").write_text(config)
    prompts, _ = make_requests(23, [("dora", 20), ("dora", 33)])
    llm = make_llm(demo_dir, {"dora": dora_adapters["dora"], "plain": plain})
    with_dora = llm.generate(prompts, greedy(12), adapter="dora")
    as_lora = llm.generate(prompts, greedy(12), adapter="plain")
    assert [o.token_ids for o in with_dora] != [o.token_ids for o in as_lora]


def test_dora_weights_are_checked(dora_adapters, tmp_path):
    source = dora_adapters["dora-rs"]
    tensors = load_file(str(source / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    cases = {
        "missing": ({k: v for k, v in tensors.items() if k != key}, "use_dora"),
        "shape": ({**tensors, key: tensors[key][:-1]}, "shape"),
        "negative": ({**tensors, key: -tensors[key]}, r"\(0, "),
        "nan": ({**tensors, key: tensors[key] * float("nan")}, "NaN"),
    }
    for case, (edited, pattern) in cases.items():
        path = tmp_path / case
        path.mkdir()
        (path / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
        save_file(edited, str(path / "adapter_model.safetensors"))
        with pytest.raises(LoraplexError, match=pattern) as info:
            load_peft_lora(path, case, None, 64)
        assert info.value.field == "adapter_model.safetensors", case


def test_merges_refuse_dora_inputs(dora_adapters, peft_adapters):
    dora = load_peft_lora(dora_adapters["dora"], "dora", None, 64)
    lora = load_peft_lora(peft_adapters["q1"], "q1", None, 64)
    assert dora.kind == "dora" and lora.kind == "lora"
    for method in ("cat", "svd", "ties"):
        with pytest.raises(LoraplexError, match="DoRA") as info:
            merge([lora, dora], None, MergeParams(method, rank=4), "m")
        assert info.value.field == "sources"
