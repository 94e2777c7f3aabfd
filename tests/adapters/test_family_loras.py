"""PEFT LoRAs on Gemma 2, Gemma 3 and Phi-3 bases (tests/tiny_families.py) batched together with base requests,
against transformers + peft: greedy tokens and fp32 logprobs, on both kernel backends. Phi-3's adapters target its
fused projections (qkv_proj, gate_up_proj), which loraplex splits across the slices of its own layers; one of them
is a DoRA adapter; a `cat` merge of two Phi-3 adapters equals PEFT's add_weighted_adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import PeftReference, build_peft_adapter, load_hf_base
from test_peft_parity import TARGETS, assert_logprobs_match, assert_tokens_match, greedy, make_llm, make_requests
from tiny_families import FAMILIES, TOKENIZER_FILES, family_config, write_random_checkpoint

from loraplex.adapters_store.formats import load_peft_lora
from loraplex.adapters_store.peft_export import write_peft_lora
from loraplex.arithmetic import MergeParams, merge
from loraplex.errors import LoraplexError
from loraplex.models.model_config import ModelConfig

SPECIAL_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=4)
ATTENTION = {"phi3": ["qkv_proj", "o_proj"]}
MLP = {"phi3": ["gate_up_proj", "down_proj"]}


def _write_base(root: Path, family: str, demo_dir: Path) -> Path:
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(Path(demo_dir) / "tokenizer.json")).get_vocab_size()
    config, model_cls = family_config(family, vocab, SPECIAL_IDS)
    return write_random_checkpoint(root / "base", demo_dir, config, model_cls, seed=21)


@pytest.fixture(scope="module")
def families(demo_dir, tmp_path_factory):
    """family name -> (family, base dir, adapters, reference), made on first use."""
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = _make_family(name, demo_dir, tmp_path_factory.mktemp(name))
        return made[name]
    return get


@pytest.fixture(params=FAMILIES)
def family(request, families):
    return families(request.param)


def _make_family(name: str, demo_dir: Path, root: Path):
    """(family, base dir, adapters, reference): a tiny random base and three PEFT adapters made on it: attention
    (DoRA on Phi-3), MLP with rsLoRA, and both."""
    base = _write_base(root, name, demo_dir)
    attn = ATTENTION.get(name, ["q_proj", "k_proj", "v_proj", "o_proj"])
    mlp = MLP.get(name, ["gate_proj", "up_proj", "down_proj"])
    adapters = {
        "attn": build_peft_adapter(root / "attn", {"r": 8, "lora_alpha": 16, "target_modules": attn,
                                                   "use_dora": name == "phi3"}, seed=1, rel=0.3, base_dir=base),
        "mlp": build_peft_adapter(root / "mlp", {"r": 4, "lora_alpha": 4, "use_rslora": True, "target_modules": mlp},
                                  seed=2, rel=0.3, base_dir=base),
        "all": build_peft_adapter(root / "all", {"r": 4, "lora_alpha": 8, "target_modules": attn + mlp},
                                  seed=3, rel=0.3, base_dir=base),
    }
    return name, base, adapters, PeftReference(base, dict(adapters))


@pytest.mark.parametrize("target", TARGETS)
def test_family_loras_in_a_mixed_batch_match_peft(family, target):
    name, base, adapters, reference = family
    # prompts longer than the families' 24-token windows and Phi-3's 64-token original context, and short ones
    # Phi-3 served within its original context: the short LongRoPE factors, as transformers uses on these lengths
    long, options = (40, {"max_model_len": 64}) if name == "phi3" else (70, {})
    plan = [("attn", 21), (None, 9), ("mlp", 0), ("all", long), ("attn", 0), (None, 33), ("mlp", 14), ("all", 3)]
    prompts, names = make_requests(41, plan)
    max_new = target[2]
    llm = make_llm(base, adapters, target, **options)
    outputs = llm.generate(prompts, greedy(max_new), adapter=names)
    assert_tokens_match(reference, prompts, names, outputs, max_new=max_new)
    assert_logprobs_match(reference, prompts, names, outputs, max_new)
    assert outputs[0].token_ids != outputs[2].token_ids  # one prompt on two adapters: they change the output


def test_a_multimodal_gemma3_serves_its_text_model_with_its_loras(demo_dir, tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (config.json with text_config; tensors under language_model.*,
    beside a vision tower and projector): loraplex serves its text model, and PEFT LoRAs made on the multimodal
    model batch with base requests, against transformers + peft running the multimodal model on text: one limited
    to the language model, one on every q_proj (the vision tower's too: text never reaches those, so they are
    skipped). A merge of the two, written for this base, loads in peft and serves there as in loraplex."""
    base = _write_base(tmp_path, "gemma3-multimodal", demo_dir)
    config = ModelConfig.from_file(base / "config.json")
    text_only = r".*language_model.*\.(q_proj|v_proj|gate_proj|down_proj)"
    adapters = {"text": build_peft_adapter(tmp_path / "text", {"r": 8, "lora_alpha": 16, "target_modules": text_only},
                                           seed=4, rel=0.3, base_dir=base),
                "every": build_peft_adapter(tmp_path / "every", {"r": 4, "lora_alpha": 16,
                                                                 "target_modules": ["q_proj"]}, seed=5, rel=0.6,
                                            base_dir=base)}
    assert {m for _, m in load_peft_lora(adapters["every"], "every", config, 64).modules} == {"q_proj"}
    merged = merge([load_peft_lora(adapters[n], n, config, 64) for n in ("text", "every")], [0.7, 0.6],
                   MergeParams(method="cat"), "merged")
    adapters["merged"] = write_peft_lora(merged, tmp_path / "merged", base=config)
    reference = PeftReference(base, dict(adapters))
    assert type(reference.model(None)).__name__ == "Gemma3ForConditionalGeneration"
    plan = [("text", 30), (None, 0), ("every", 0), ("merged", 0), ("text", 9), (None, 50), ("merged", 12)]
    prompts, names = make_requests(44, plan)
    llm = make_llm(base, adapters)
    outputs = llm.generate(prompts, greedy(8), adapter=names)
    assert_tokens_match(reference, prompts, names, outputs, max_new=8)
    assert_logprobs_match(reference, prompts, names, outputs, 8)
    # one prompt four ways: each adapter changes its first step's log-probs
    assert len({tuple(round(v, 3) for _, v in out.logprobs[0].top) for out in outputs[:4]}) == 4


def test_fused_phi3_loras_split_into_their_parts(families):
    """A LoRA on Phi-3's qkv_proj becomes LoRAs on q_proj, k_proj and v_proj sharing lora_A, each with its rows
    of lora_B (and of the DoRA magnitude): their stacked update is PEFT's fused one."""
    _, base, adapters, _ = families("phi3")
    config = ModelConfig.from_file(base / "config.json")
    adapter = load_peft_lora(adapters["attn"], "attn", config, 64)
    assert adapter.kind == "dora"
    up = load_peft_lora(adapters["mlp"], "mlp", config, 64).modules
    assert {m for _, m in up} == {"gate_proj", "up_proj", "down_proj"}
    from safetensors.torch import load_file

    raw = load_file(str(adapters["attn"] / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn.qkv_proj"
    fused_b = raw[f"{prefix}.lora_B.weight"].float()
    parts = [adapter.modules[(0, m)] for m in ("q_proj", "k_proj", "v_proj")]
    assert all(torch.equal(p.a, raw[f"{prefix}.lora_A.weight"].float()) for p in parts)
    assert torch.equal(torch.cat([p.b for p in parts]), fused_b)
    assert [p.b.shape[0] for p in parts] == [64, 32, 32]
    assert torch.equal(torch.cat([p.magnitude for p in parts]), raw[f"{prefix}.lora_magnitude_vector"].float())
    # the file's bytes in fp32: the parts' shared lora_A held (and counted) once
    assert adapter.num_bytes == sum(t.float().nbytes for t in raw.values())


def test_a_fused_lora_that_cannot_be_split_without_the_base_is_refused(families, tmp_path):
    """Offline (no base model), q/k/v sizes are unknown: a qkv_proj LoRA is refused naming --base; a gate_up_proj
    LoRA splits in halves, unless its rows are odd."""
    from safetensors.torch import load_file, save_file

    _, _, adapters, _ = families("phi3")
    with pytest.raises(LoraplexError, match=r"qkv_proj splits into q_proj/k_proj/v_proj .*--base"):
        load_peft_lora(adapters["attn"], "attn", None, 64)
    halves = load_peft_lora(adapters["mlp"], "mlp", None, 64).modules
    assert halves[(0, "gate_proj")].b.shape[0] == halves[(0, "up_proj")].b.shape[0] == 128
    odd = tmp_path / "odd"
    shutil.copytree(adapters["mlp"], odd)
    tensors = load_file(str(odd / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight"
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, str(odd / "adapter_model.safetensors"))
    with pytest.raises(LoraplexError, match="lora_B has 255 rows"):
        load_peft_lora(odd, "odd", None, 64)


def test_a_cat_merge_of_phi3_loras_matches_peft(demo_dir, tmp_path):
    """loraplex's cat merge of two Phi-3 adapters on fused projections, written and served, against PEFT's
    add_weighted_adapter(combination_type="cat") on the same adapters: the same greedy tokens and logprobs."""
    from peft import PeftModel

    base = _write_base(tmp_path, "phi3", demo_dir)
    attn, mlp = ATTENTION["phi3"], MLP["phi3"]
    made = {"x": build_peft_adapter(tmp_path / "x", {"r": 4, "lora_alpha": 8, "target_modules": attn + mlp},
                                    seed=5, rel=0.3, base_dir=base),
            "y": build_peft_adapter(tmp_path / "y", {"r": 8, "lora_alpha": 8, "target_modules": attn},
                                    seed=6, rel=0.3, base_dir=base)}
    weights = [0.8, -0.5]
    config = ModelConfig.from_file(base / "config.json")
    merged = merge([load_peft_lora(made[n], n, config, 64) for n in ("x", "y")], weights,
                   MergeParams(method="cat"), "merged")
    write_peft_lora(merged, tmp_path / "ours", base=config)

    model = PeftModel.from_pretrained(load_hf_base(base), made["x"], adapter_name="x")
    model.load_adapter(made["y"], adapter_name="y")
    model.add_weighted_adapter(["x", "y"], weights, "merged", combination_type="cat")
    model.save_pretrained(tmp_path / "peft", selected_adapters=["merged"])
    # PEFT's merge, and loraplex's written back fused (qkv_proj, gate_up_proj): peft loads it as it is
    reference = PeftReference(base, {"merged": tmp_path / "peft" / "merged", "ours": tmp_path / "ours"})

    prompts, names = make_requests(7, [("merged", 12), (None, 30), ("merged", 40)])
    llm = make_llm(base, {"merged": tmp_path / "ours"}, max_model_len=64)
    outputs = llm.generate(prompts, greedy(8), adapter=names)
    assert_tokens_match(reference, prompts, names, outputs, max_new=8)
    assert_logprobs_match(reference, prompts, names, outputs, 8)
    as_peft_loads_it = ["ours" if name else None for name in names]
    assert_logprobs_match(reference, prompts, as_peft_loads_it, outputs, 8)


@pytest.mark.parametrize("method", ["svd", "dare_linear"])
def test_phi3_merges_whose_parts_differ_in_lora_a_load_in_peft(families, tmp_path, method):
    """svd and DARE merges give each part of a fused projection its own lora_A: written for Phi-3 they fuse back
    into one qkv_proj / gate_up_proj (stacked lora_A, block-diagonal lora_B, the same update), which peft loads
    and serves as loraplex serves the merge (and the CLI writes it so with --base)."""
    from loraplex.cli import main

    _, base, adapters, _ = families("phi3")
    extra = ["--rank", "8"] if method == "svd" else ["--density", "0.7"]
    out = tmp_path / "merged"
    assert main(["merge", "--method", method, "--adapter", f"{adapters['mlp']}:0.9", "--adapter",
                 f"{adapters['all']}:0.6", "--base", str(base), "-o", str(out), *extra]) == 0
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        names = {key.rsplit(".", 2)[0].rsplit(".", 1)[1] for key in f.keys()}  # noqa: SIM118
        qkv_rank = f.get_tensor("base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight").shape[0]
    assert names == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert qkv_rank > 8  # the parts' own lora_A stacked: the block-diagonal form, not one shared lora_A
    # read back, each part has its own rank again (what a server with --max-lora-rank of the merge's rank takes)
    rank = 8 if method == "svd" else 4
    parts = load_peft_lora(out, "merged", ModelConfig.from_file(base / "config.json"), rank).modules
    assert max(m.rank for m in parts.values()) == rank
    reference = PeftReference(base, {"merged": out})
    prompts, names = make_requests(9, [("merged", 20), (None, 7), ("merged", 33)])
    outputs = make_llm(base, {"merged": out}, max_model_len=64).generate(prompts, greedy(6), adapter=names)
    assert_tokens_match(reference, prompts, names, outputs, max_new=6)
    assert_logprobs_match(reference, prompts, names, outputs, 6)


def test_a_sparse_delta_of_a_phi3_finetune_serves_the_finetune(demo_dir, tmp_path, capsys):
    """`loraplex adapters sparsify` on a Phi-3 checkpoint (fused qkv_proj / gate_up_proj in the files) and a copy
    with every projection changed: at density 1 the served sparse delta is the changed model, token for token
    against transformers running it."""
    from loraplex.cli import main

    base = _write_base(tmp_path, "phi3", demo_dir)
    model = load_hf_base(base)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 2)[-2] in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    finetuned = tmp_path / "finetuned"
    model.save_pretrained(finetuned)
    for name in TOKENIZER_FILES:
        shutil.copy(base / name, finetuned / name)
    out = tmp_path / "delta"
    assert main(["adapters", "sparsify", "--base", str(base), "--finetuned", str(finetuned), "--density", "1",
                 "--dtype", "float32", "-o", str(out)]) == 0
    assert "differ" not in capsys.readouterr().err  # the fused tensors are held, as their parts: no warning
    llm = make_llm(base, {"ft": out}, max_model_len=64, max_sparse_density=1.0)
    prompts, _ = make_requests(43, [(None, 12), (None, 40), (None, 3)])
    outputs = llm.generate(prompts, greedy(8), adapter="ft")
    reference = PeftReference(finetuned, {})
    changed = 0
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = reference.greedy(None, prompt, 8)
        assert output.token_ids == expected
        changed += PeftReference(base, {}).greedy(None, prompt, 8) != expected
    assert changed >= 2, "the change barely moved the model: the test would not see a wrong delta"
