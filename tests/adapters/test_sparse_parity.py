"""Sparse-delta adapters (loraplex's CSR format, docs/adapters.md) served against `transformers` with each
delta merged into its weights: greedy tokens and fp32 logprobs in batches mixing them with LoRA adapters
and base requests, on the torch and Triton backends and through two slots; and the loader's checks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import PeftReference, load_hf_base
from safetensors.torch import load_file, save_file
from test_peft_parity import TARGETS, assert_logprobs_match, assert_tokens_match, greedy, make_llm, make_requests

from loraplex.adapters_store.formats import load_peft_lora
from loraplex.adapters_store.sparse_format import SparseDelta, write_sparse_delta
from loraplex.errors import LoraplexError

# name -> (modules it adapts, density, seed)
SPARSE = {
    "sp-attn": (["self_attn.q_proj", "self_attn.o_proj", "self_attn.v_proj"], 0.02, 501),
    "sp-mlp": (["mlp.gate_proj", "mlp.down_proj", "self_attn.k_proj"], 0.005, 502),
}


def random_delta(weight: torch.Tensor, density: float, gen: torch.Generator) -> SparseDelta:
    """A random CSR delta shaped like `weight`, its entries about 4x the weight's rms: enough to move the
    greedy tokens."""
    out_features, in_features = weight.shape
    keep = torch.rand(out_features, in_features, generator=gen) < density
    values = torch.randn(out_features, in_features, generator=gen) * 4 * float(weight.float().pow(2).mean().sqrt())
    csr = (values * keep).to_sparse_csr()
    return SparseDelta(crow=csr.crow_indices(), col=csr.col_indices(), values=csr.values(),
                       shape=(out_features, in_features))


class MergedReference(PeftReference):
    """PEFT's reference for LoRA adapters, and for each sparse delta the base model with S added to W."""

    def __init__(self, base_dir: Path, adapters: dict, deltas: dict[str, dict[str, SparseDelta]]) -> None:
        super().__init__(base_dir, adapters)
        self.deltas = deltas

    def model(self, adapter):
        if adapter not in self.deltas:
            return super().model(adapter)
        if adapter not in self._models:
            model = load_hf_base(self.base_dir)
            with torch.no_grad():
                for name, delta in self.deltas[adapter].items():
                    model.get_submodule(name).weight += delta.dense()
            self._models[adapter] = model
        return self._models[adapter]


@pytest.fixture(scope="module")
def sparse(demo_dir, tmp_path_factory, peft_adapters):
    root = tmp_path_factory.mktemp("sparse")
    base = load_hf_base(demo_dir)
    deltas, paths = {}, {}
    for name, (modules, density, seed) in SPARSE.items():
        gen = torch.Generator().manual_seed(seed)
        deltas[name] = {f"model.layers.{layer}.{m}": random_delta(base.get_submodule(f"model.layers.{layer}.{m}")
                                                                  .weight.detach(), density, gen)
                        for layer in range(4) for m in modules}
        paths[name] = write_sparse_delta(deltas[name], root / name, str(demo_dir), dtype=torch.float32)
    reference = MergedReference(Path(demo_dir), {n: peft_adapters[n] for n in ("q1", "rs")}, deltas)
    return paths, reference


PLAN = [("sp-attn", 25), (None, 8), ("q1", 0), ("sp-mlp", 40), ("sp-attn", 0), ("rs", 13), ("sp-mlp", 3),
        (None, 0), ("sp-attn", 17)]


@pytest.mark.parametrize("target", TARGETS)
def test_sparse_deltas_in_a_mixed_batch_match_the_merged_model(demo_dir, peft_adapters, sparse, target):
    paths, reference = sparse
    prompts, adapters = make_requests(31, PLAN)
    max_new = target[2]
    llm = make_llm(demo_dir, {**paths, "q1": peft_adapters["q1"], "rs": peft_adapters["rs"]}, target)
    loaded = llm.engine.adapters.host.get(llm.engine.adapters.key("sp-attn"))
    assert loaded.kind == "sparse" and loaded.rank == 0
    outputs = llm.generate(prompts, greedy(max_new), adapter=adapters)
    assert_tokens_match(reference, prompts, adapters, outputs, max_new=max_new)
    assert_logprobs_match(reference, prompts, adapters, outputs, max_new)


def test_sparse_deltas_through_two_slots_match(demo_dir, peft_adapters, sparse):
    paths, reference = sparse
    names = ["sp-attn", "sp-mlp", "q1", "rs"]
    rng = random.Random(7)
    plan = [(names[i % 4] if i % 3 else None, rng.randrange(1, 35)) for i in range(12)]
    prompts, adapters = make_requests(32, plan)
    llm = make_llm(demo_dir, {**paths, "q1": peft_adapters["q1"], "rs": peft_adapters["rs"]}, max_loras=2,
                   max_cpu_adapters=2)
    outputs = llm.generate(prompts, greedy(10), adapter=adapters)
    assert llm.engine.adapters.slots.evictions > 0
    assert_tokens_match(reference, prompts, adapters, outputs, max_new=10)
    assert_logprobs_match(reference, prompts, adapters, outputs, 10)


def _pool_budget(demo_dir, paths, fits: list[str], max_loras: int) -> int:
    """--max-sparse-memory in bytes holding the adapters `fits` at once (fp32), and not one entry more."""
    from loraplex.models.sparse_pool import entry_bytes

    llm_free = make_llm(demo_dir, {}, max_loras=max_loras)  # for the row tables' size
    layers = [m for m in llm_free.engine.model.modules() if getattr(m, "lora", None) is not None]
    row_tables = sum((max_loras + 1) * (layer.out_features + 1) * 4 for layer in layers)
    need = sum(load_peft_lora(paths[name], name, None, 16).nnz for name in fits)
    return row_tables + (need + 1) * entry_bytes(torch.float32, torch.device("cpu"))  # + the pool's zero entry


@pytest.mark.parametrize("target", TARGETS)
def test_a_sparse_pool_for_one_adapter_serves_two_in_turn(demo_dir, peft_adapters, sparse, target):
    """--max-sparse-memory sized for the larger sparse delta alone: with free slots, each sparse adapter still
    waits for the other's pool range, which is evicted once idle; LoRA requests run beside both; outputs match
    the merged model, and the pool never holds more than its capacity."""
    paths, reference = sparse
    nnz = {name: load_peft_lora(paths[name], name, None, 16).nnz for name in SPARSE}
    budget = _pool_budget(demo_dir, paths, [max(nnz, key=nnz.get)], max_loras=4)
    plan = [("sp-attn", 25), ("q1", 0), ("sp-mlp", 40), (None, 5), ("sp-attn", 3), ("sp-mlp", 0), ("q1", 11)]
    prompts, adapters = make_requests(36, plan)
    max_new = target[2]
    llm = make_llm(demo_dir, {**paths, "q1": peft_adapters["q1"]}, target, max_loras=4, max_sparse_memory=budget)
    pool = llm.engine.model.sparse_pool
    assert pool.capacity == max(nnz.values()) < sum(nnz.values())
    seen = []
    original = pool.allocate
    pool.allocate = lambda slot, entries: (original(slot, entries), seen.append(pool.used))[0]
    outputs = llm.generate(prompts, greedy(max_new), adapter=adapters)
    assert llm.engine.adapters.slots.evictions >= 1 and max(seen) <= pool.capacity
    assert_tokens_match(reference, prompts, adapters, outputs, max_new=max_new)
    assert_logprobs_match(reference, prompts, adapters, outputs, max_new)


def test_a_full_pool_serves_adapters_whose_parts_skip_layers(demo_dir, peft_adapters, sparse):
    """The pool exactly full, sp-attn's range last: in each MLP layer (where sp-attn has no entries) its part
    would start at the end of its range, the end of the pool, while sp-mlp's part there sets the window."""
    paths, reference = sparse
    budget = _pool_budget(demo_dir, paths, list(SPARSE), max_loras=2)
    prompts, adapters = make_requests(37, [("sp-mlp", 5), ("sp-attn", 5)])
    llm = make_llm(demo_dir, paths, max_loras=2, max_sparse_memory=budget)
    outputs = llm.generate(prompts, greedy(4), adapter=adapters)
    pool = llm.engine.model.sparse_pool
    assert pool.free == 0 and max(start + length for start, length in pool.ranges.values()) == pool.length
    assert_tokens_match(reference, prompts, adapters, outputs, max_new=4)


def test_a_sparse_adapter_larger_than_the_pool_is_refused_and_none_without_one(demo_dir, peft_adapters, sparse):
    paths, _ = sparse
    budget = _pool_budget(demo_dir, paths, ["sp-mlp"], max_loras=2)
    llm = make_llm(demo_dir, {"q1": peft_adapters["q1"]}, max_loras=2, max_sparse_memory=budget)
    engine = llm.engine
    engine.add_adapter("sp-mlp", paths["sp-mlp"])  # fits exactly
    with pytest.raises(LoraplexError, match="larger --max-sparse-memory") as info:
        engine.add_adapter("sp-attn", paths["sp-attn"])
    assert info.value.field == "max_sparse_memory" and "sp-attn" not in engine.adapters
    no_pool = make_llm(demo_dir, {"q1": peft_adapters["q1"]}, max_loras=2, max_sparse_memory=0)
    assert no_pool.engine.model.sparse_pool is None
    with pytest.raises(LoraplexError, match="serves no sparse adapters"):
        no_pool.engine.add_adapter("sp-mlp", paths["sp-mlp"])
    prompts, _ = make_requests(37, [("q1", 9)])  # LoRA still served
    assert no_pool.generate(prompts, greedy(4), adapter="q1")[0].finished


def test_a_sparse_delta_changes_the_output(demo_dir, sparse):
    paths, reference = sparse
    prompts, _ = make_requests(33, [(None, 20), (None, 30)])
    for prompt in prompts:
        assert reference.greedy("sp-attn", prompt, 12) != reference.greedy(None, prompt, 12)


def edit(source: Path, target: Path, change) -> Path:
    target.mkdir()
    (target / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    tensors = load_file(str(source / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    return target


PREFIX = "base_model.model.model.layers.0.self_attn.q_proj.sparse_delta"


def _swap_first_columns(t):
    crow, col = t[f"{PREFIX}.crow_indices"], t[f"{PREFIX}.col_indices"].clone()
    row = int(((crow[1:] - crow[:-1]) >= 2).nonzero()[0])  # a row with two entries
    first = int(crow[row])
    col[first], col[first + 1] = col[first + 1].clone(), col[first].clone()
    t[f"{PREFIX}.col_indices"] = col


@pytest.mark.parametrize(("case", "change", "pattern"), [
    ("column out of range", lambda t: t[f"{PREFIX}.col_indices"].__setitem__(0, 10**6), "outside"),
    ("unsorted columns", _swap_first_columns, "strictly increasing"),
    ("crow end", lambda t: t.__setitem__(f"{PREFIX}.crow_indices", t[f"{PREFIX}.crow_indices"][:-1]),
     "crow_indices"),
    ("crow decreasing", lambda t: t[f"{PREFIX}.crow_indices"].__setitem__(3, 10**6), "crow_indices"),
    ("nan", lambda t: t[f"{PREFIX}.values"].__setitem__(0, float("nan")), "NaN"),
    ("shape", lambda t: t.__setitem__(f"{PREFIX}.shape", torch.tensor([7, 9])), "another base model"),
    ("missing part", lambda t: t.pop(f"{PREFIX}.values"), "values is missing"),
])
def test_bad_sparse_deltas_are_refused_naming_the_module(demo_dir, sparse, tmp_path, case, change, pattern):
    from loraplex.models.model_config import ModelConfig

    paths, _ = sparse
    path = edit(paths["sp-attn"], tmp_path / "bad", change)
    with pytest.raises(LoraplexError, match=pattern) as info:
        load_peft_lora(path, "bad", ModelConfig.from_file(Path(demo_dir) / "config.json"), 16)
    assert info.value.field == "adapter_model.safetensors"
    assert "layers.0.self_attn.q_proj" in info.value.message or case == "shape"


def test_the_density_limit_is_enforced(demo_dir, sparse):
    paths, _ = sparse
    with pytest.raises(LoraplexError, match="max-sparse-density") as info:
        load_peft_lora(paths["sp-attn"], "dense", None, 16, max_sparse_density=0.01)
    assert info.value.field == "adapter_config.json"
    assert load_peft_lora(paths["sp-attn"], "ok", None, 16, max_sparse_density=0.05).nnz > 0


def test_sparse_dora_lora_and_base_in_one_batch(demo_dir, peft_adapters, sparse, tmp_path):
    """Every kind in the same steps: a sparse delta, a DoRA adapter, a LoRA and the base model."""
    from test_dora_parity import DORA, build_dora

    paths, reference = sparse
    kwargs, seed = DORA["dora"]
    dora = build_dora(Path(demo_dir), tmp_path / "dora", kwargs, seed)
    reference.add("dora", dora)
    plan = [("sp-attn", 20), ("dora", 0), ("q1", 0), (None, 0), ("sp-mlp", 33), ("dora", 7), ("sp-attn", 0)]
    prompts, adapters = make_requests(34, plan)
    llm = make_llm(demo_dir, {**paths, "dora": dora, "q1": peft_adapters["q1"]})
    outputs = llm.generate(prompts, greedy(12), adapter=adapters)
    assert_tokens_match(reference, prompts, adapters, outputs, max_new=12)
    assert_logprobs_match(reference, prompts, adapters, outputs, 12)


def test_a_composition_of_sparse_deltas_is_their_sum_and_offline_cat_writes_it(demo_dir, sparse, tmp_path):
    """`sp-attn + sp-mlp*-0.5` served as a per-request composition (the engine's own registry) equals the
    base model with S_attn - 0.5·S_mlp merged in; `loraplex merge --method cat` writes that sum as a sparse
    delta, served the same."""
    from loraplex.arithmetic import MergeParams
    from loraplex.cli import main
    from loraplex.engine.compositions import Recipe

    paths, reference = sparse
    summed = {n: d.dense() for n, d in reference.deltas["sp-attn"].items()}
    for name, delta in reference.deltas["sp-mlp"].items():
        summed[name] = summed.get(name, torch.zeros(delta.shape)) - 0.5 * delta.dense()
    from loraplex.adapters_store.sparse_format import from_dense

    reference.deltas["sum"] = {n: from_dense(m) for n, m in summed.items()}
    llm = make_llm(demo_dir, paths, max_sparse_density=0.05)
    recipe = Recipe(inputs=(("sp-attn", 1.0), ("sp-mlp", -0.5)), params=MergeParams("cat"))
    name, build = llm.engine.prepare_composition(recipe)
    llm.engine.add_composition(name, recipe, build, build())
    prompts, _ = make_requests(35, [("sum", 18), ("sum", 40)])
    outputs = llm.generate(prompts, greedy(12), adapter=name)
    assert_tokens_match(reference, prompts, ["sum"] * 2, outputs, served_as=[name] * 2, max_new=12)
    assert_logprobs_match(reference, prompts, ["sum"] * 2, outputs, 12)
    out = tmp_path / "sum"
    assert main(["merge", "--method", "cat", f"--adapter={paths['sp-attn']}", f"--adapter={paths['sp-mlp']}:-0.5",
                 "-o", str(out)]) == 0
    written = load_peft_lora(out, "sum", None, 16)
    assert written.kind == "sparse"
    for (layer, module), m in written.modules.items():
        full = next(n for n in summed if n.startswith(f"model.layers.{layer}.") and n.endswith(module))
        torch.testing.assert_close(m.sparse.dense(), summed[full])


def write_rosa(directory: Path, base, seed: int) -> dict[str, torch.Tensor]:
    """A RoSA adapter in peft-rosa's layout (rosa_A / rosa_B, rosa_spa.values / row_offs / row_idx / col_idx
    with int16 columns, unsorted within rows as spops allows, values in bfloat16); returns each module's
    ΔW = s·B·A + S, computed here from the tensors written."""
    import json

    gen = torch.Generator().manual_seed(seed)
    r, alpha = 4, 8
    tensors, updates = {}, {}
    for layer in range(4):
        for module in ("self_attn.q_proj", "mlp.up_proj"):
            name = f"model.layers.{layer}.{module}"
            weight = base.get_submodule(name).weight.detach()
            out_f, in_f = weight.shape
            a = torch.randn(r, in_f, generator=gen) / in_f**0.5
            b = torch.randn(out_f, r, generator=gen) * 0.1
            keep = torch.rand(out_f, in_f, generator=gen) < 0.01
            dense = (torch.randn(out_f, in_f, generator=gen) * 4 * float(weight.pow(2).mean().sqrt()) * keep)
            dense = dense.to(torch.bfloat16).float()
            csr = dense.to_sparse_csr()
            crow, col, values = csr.crow_indices(), csr.col_indices().clone(), csr.values().clone()
            for row in range(out_f):  # reverse the columns of every row: valid CSR for spops, unsorted
                lo, hi = int(crow[row]), int(crow[row + 1])
                col[lo:hi], values[lo:hi] = col[lo:hi].flip(0), values[lo:hi].flip(0)
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.rosa_A.weight"] = a
            tensors[f"{prefix}.rosa_B.weight"] = b
            tensors[f"{prefix}.rosa_spa.values"] = values.to(torch.bfloat16)
            tensors[f"{prefix}.rosa_spa.row_offs"] = crow.to(torch.int32)
            tensors[f"{prefix}.rosa_spa.col_idx"] = col.to(torch.int16)
            tensors[f"{prefix}.rosa_spa.row_idx"] = torch.argsort(crow[1:] - crow[:-1], descending=True).to(torch.int16)
            updates[name] = (alpha / r) * b @ a + dense
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "ROSA", "r": r, "d": 0.01, "lora_alpha": alpha, "target_modules": ["q_proj", "up_proj"],
        "bias": "none", "use_rslora": False, "rosa_dtype": "bf16", "impl": "auto"}))
    return updates


def test_a_rosa_adapter_in_peft_rosas_layout_matches_the_merged_model(demo_dir, peft_adapters, sparse, tmp_path):
    from loraplex.adapters_store.sparse_format import from_dense

    paths, reference = sparse
    updates = write_rosa(tmp_path / "rosa", load_hf_base(demo_dir), seed=71)
    reference.deltas["rosa"] = {n: from_dense(u) for n, u in updates.items()}
    adapter = load_peft_lora(tmp_path / "rosa", "rosa", None, 16)
    assert adapter.kind == "rosa" and adapter.rank == 4 and adapter.nnz > 0
    plan = [("rosa", 22), (None, 0), ("sp-attn", 0), ("rosa", 37), ("q1", 9)]
    prompts, adapters = make_requests(36, plan)
    llm = make_llm(demo_dir, {"rosa": tmp_path / "rosa", "sp-attn": paths["sp-attn"], "q1": peft_adapters["q1"]})
    outputs = llm.generate(prompts, greedy(12), adapter=adapters)
    assert_tokens_match(reference, prompts, adapters, outputs, max_new=12)
    assert_logprobs_match(reference, prompts, adapters, outputs, 12)


def test_an_offline_ties_merge_of_lora_and_sparse_writes_a_rosa_adapter_served_as_merged(demo_dir, peft_adapters,
                                                                                        sparse, tmp_path):
    """`loraplex merge --method ties` of a LoRA and a sparse delta: a low-rank + sparse result, written in
    peft-rosa's layout, read back equal to the merge in memory and served as the base model with it merged."""
    from loraplex.adapters_store.peft_export import module_path
    from loraplex.adapters_store.sparse_format import from_dense
    from loraplex.arithmetic import MergeParams, delta, merge
    from loraplex.cli import main

    paths, reference = sparse
    out = tmp_path / "rosa"
    assert main(["merge", "--method", "ties", "--density", "0.3", f"--adapter={peft_adapters['q1']}",
                 f"--adapter={paths['sp-attn']}:0.8", "-o", str(out)]) == 0
    written = load_peft_lora(out, "rosa", None, 64)
    inputs = [load_peft_lora(peft_adapters["q1"], "q1", None, 64), load_peft_lora(paths["sp-attn"], "s", None, 64)]
    in_memory = merge(inputs, [1.0, 0.8], MergeParams("ties", density=0.3), "m")
    assert written.kind == "rosa" and set(written.modules) == set(in_memory.modules)

    def full(module):
        return delta(module) + (0 if module.sparse is None else module.sparse.dense())

    for key, module in in_memory.modules.items():
        torch.testing.assert_close(full(written.modules[key]), full(module), atol=1e-6, rtol=1e-5)
    reference.deltas["ties-rosa"] = {module_path(*key): from_dense(full(m)) for key, m in written.modules.items()}
    prompts, _ = make_requests(38, [("ties-rosa", 21), ("ties-rosa", 6)])
    llm = make_llm(demo_dir, {"ties-rosa": out})
    outputs = llm.generate(prompts, greedy(12), adapter="ties-rosa")
    assert_tokens_match(reference, prompts, ["ties-rosa"] * 2, outputs, max_new=12)
    assert_logprobs_match(reference, prompts, ["ties-rosa"] * 2, outputs, 12)


def test_room_in_the_pool_is_made_by_evicting_adapters_that_hold_entries(demo_dir, peft_adapters, sparse):
    """A slot is free but the pool is not: the LRU idle LoRA (which holds no entries) stays resident;
    the idle sparse delta goes."""
    paths, _ = sparse
    nnz = {name: load_peft_lora(paths[name], name, None, 16).nnz for name in SPARSE}
    budget = _pool_budget(demo_dir, paths, [max(nnz, key=nnz.get)], max_loras=4)
    llm = make_llm(demo_dir, {**paths, "q1": peft_adapters["q1"]}, max_loras=4, max_sparse_memory=budget)
    prompts, _ = make_requests(39, [(None, 5)])
    for name in ("q1", "sp-attn", "sp-mlp"):  # one after another: each idle when the next comes
        llm.generate(prompts, greedy(2), adapter=name)
    adapters = llm.engine.adapters
    assert adapters.slots.resident(adapters.key("q1")) and adapters.slots.resident(adapters.key("sp-mlp"))
    assert not adapters.slots.resident(adapters.key("sp-attn")) and adapters.slots.evictions == 1


def test_a_merge_that_cancels_out_writes_nothing_and_says_so(sparse, tmp_path, capsys):
    from loraplex.cli import main

    paths, _ = sparse
    out = tmp_path / "zero"
    assert main(["merge", "--method", "cat", f"--adapter={paths['sp-attn']}", f"--adapter={paths['sp-attn']}:-1",
                 "-o", str(out)]) == 2
    assert "every entry of the merged sparse delta is zero" in capsys.readouterr().err
    assert not (out / "adapter_model.safetensors").exists()
