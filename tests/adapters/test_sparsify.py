"""`loraplex adapters sparsify` on a briefly fine-tuned copy of the tiny model (its projections trained a few
steps, the rest frozen): at density 1.0 the served sparse delta is the fine-tuned model, token for token
against transformers running the fine-tuned checkpoint; at a low density, exactly the largest entries are
kept, per projection or under one global threshold."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_hf_base
from test_peft_parity import greedy, make_requests

from loraplex import LLM
from loraplex.adapters_store.formats import load_peft_lora
from loraplex.cli import main

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def finetuned(demo_dir, tmp_path_factory) -> Path:
    """The demo model after 3 Adam steps on random tokens, only its projections trainable."""
    model = load_hf_base(demo_dir).train()
    for name, param in model.named_parameters():
        param.requires_grad = name.rsplit(".", 2)[-2] in PROJECTIONS
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(5, 2048, (4, 32), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("finetuned") / "model"
    model.eval().save_pretrained(out, safe_serialization=True)
    for file in Path(demo_dir).iterdir():  # tokenizer and generation config, unchanged
        if file.is_file() and not (out / file.name).exists() and "safetensors" not in file.name:
            shutil.copy(file, out / file.name)
    return out


def test_at_density_one_the_served_delta_is_the_finetuned_model(demo_dir, finetuned, tmp_path):
    out = tmp_path / "delta"
    assert main(["adapters", "sparsify", "--base", str(demo_dir), "--finetuned", str(finetuned), "--density", "1",
                 "--dtype", "float32", "-o", str(out)]) == 0
    llm = LLM(model=str(demo_dir), adapters={"ft": str(out)}, max_sparse_density=1.0, dtype="float32",
              device="cpu", max_model_len=256, kv_cache_memory="64MiB")
    prompts, _ = make_requests(41, [(None, 12), (None, 40), (None, 3)])
    outputs = llm.generate(prompts, greedy(16), adapter="ft")
    reference = load_hf_base(finetuned)
    base = load_hf_base(demo_dir)
    changed = 0
    for prompt, out_ in zip(prompts, outputs, strict=True):
        ids = torch.tensor([prompt])
        expected = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=16, eos_token_id=None, pad_token_id=4)[0, len(prompt):].tolist()
        assert out_.token_ids == expected
        before = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=16, eos_token_id=None, pad_token_id=4)[0, len(prompt):].tolist()
        changed += before != expected
    assert changed >= 2, "the fine-tuning barely changed the model: the test would not see a wrong delta"


@pytest.mark.parametrize("global_threshold", [False, True])
def test_the_largest_differences_are_kept(demo_dir, finetuned, tmp_path, global_threshold):
    from safetensors.torch import load_file

    out = tmp_path / "delta"
    flags = ["--global"] if global_threshold else []
    assert main(["adapters", "sparsify", "--base", str(demo_dir), "--finetuned", str(finetuned), "--density",
                 "0.01", "--dtype", "float32", "-o", str(out), *flags]) == 0
    adapter = load_peft_lora(out, "d", None, 16, max_sparse_density=0.05)
    old = load_file(str(next(Path(demo_dir).glob("*.safetensors"))))
    new = load_file(str(next(finetuned.glob("*.safetensors"))))
    kept_all, size = 0, 0
    magnitudes = {}
    for (layer, module), m in adapter.modules.items():
        part = "self_attn" if module in PROJECTIONS[:4] else "mlp"
        name = f"model.layers.{layer}.{part}.{module}.weight"
        delta = new[name].float() - old[name].float()
        dense = m.sparse.dense()
        kept = dense != 0
        torch.testing.assert_close(dense[kept], delta[kept])  # kept entries are the differences themselves
        assert float(delta.abs()[kept].min()) >= float(delta.abs()[~kept].max())  # and the largest of them
        if not global_threshold:
            assert abs(int(kept.sum()) - int(0.01 * delta.numel())) <= 2
        magnitudes[name] = (float(delta.abs()[kept].min()), float(delta.abs()[~kept].max()))
        kept_all += int(kept.sum())
        size += delta.numel()
    assert len(adapter.modules) == 4 * len(PROJECTIONS)
    if global_threshold:  # one threshold: every kept entry is above every dropped one, across modules
        assert min(lo for lo, _ in magnitudes.values()) >= max(hi for _, hi in magnitudes.values())
        assert abs(kept_all - int(0.01 * size)) <= 2


def test_sparsify_refuses_a_checkpoint_of_another_shape(demo_dir, tmp_path, capsys):
    assert main(["adapters", "sparsify", "--base", str(demo_dir), "--finetuned", str(tmp_path), "--density",
                 "0.1", "-o", str(tmp_path / "x")]) == 2
    assert "error" in capsys.readouterr().err
