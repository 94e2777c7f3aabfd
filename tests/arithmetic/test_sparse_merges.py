"""PEFT's merge family on adapters with sparse parts (loraplex/arithmetic/sparse_parts.py), checked against
PEFT's own `merge_utils` functions on the dense matrices: sparse inputs give a sparse result equal to
f({S_t}, w); LoRA with sparse inputs give low-rank + sparse, each part merged within its kind."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from loraplex.adapters_store.formats import LoRAAdapter, LoRAModule
from loraplex.adapters_store.sparse_format import from_dense
from loraplex.arithmetic import MergeParams, merge
from loraplex.errors import LoraplexError

OUT, IN = 24, 32
KEYS = [(0, "q_proj"), (1, "down_proj")]


def sparse_matrix(gen: torch.Generator, density: float) -> torch.Tensor:
    return torch.randn(OUT, IN, generator=gen) * (torch.rand(OUT, IN, generator=gen) < density)


def sparse_adapter(name: str, seed: int, density: float = 0.1, keys=KEYS) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {key: LoRAModule(a=torch.zeros(0, IN), b=torch.zeros(OUT, 0), scale=1.0,
                               sparse=from_dense(sparse_matrix(gen, density))) for key in keys}
    return LoRAAdapter(name=name, modules=modules)


def lora_adapter(name: str, seed: int, rank: int = 4) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {key: LoRAModule(a=torch.randn(rank, IN, generator=gen), b=torch.randn(OUT, rank, generator=gen),
                               scale=0.5) for key in KEYS}
    return LoRAAdapter(name=name, modules=modules)


def peft_f(method: str, tensors: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    w = torch.tensor(weights)
    if method == "ties":
        return merge_utils.ties(tensors, w, density, "total")
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, w, density)
    return merge_utils.task_arithmetic(tensors, w)


def dense_sparse(module: LoRAModule | None) -> torch.Tensor:
    return torch.zeros(OUT, IN) if module is None or module.sparse is None else module.sparse.dense()


@pytest.mark.parametrize("space", ["parameter", "delta"])
@pytest.mark.parametrize(("method", "density"), [("linear", None), ("ties", 0.05), ("ties", 0.2),
                                                  ("magnitude_prune", 0.03), ("magnitude_prune", 1.0)])
def test_sparse_inputs_merge_to_a_sparse_result_equal_to_peft_on_the_dense_matrices(method, density, space):
    inputs = [sparse_adapter("s1", 1), sparse_adapter("s2", 2, 0.2), sparse_adapter("s3", 3, 0.05, KEYS[:1])]
    weights = [0.7, -0.4, 1.3]
    merged = merge(inputs, weights, MergeParams(method, density=density, space=space), "out")
    assert merged.kind == "sparse" and merged.rank == 0 and set(merged.modules) == set(KEYS)
    for key in KEYS:
        expected = peft_f(method, [dense_sparse(a.modules.get(key)) for a in inputs], weights, density or 1.0)
        torch.testing.assert_close(merged.modules[key].sparse.dense(), expected, atol=1e-6, rtol=1e-6)
        assert merged.modules[key].sparse.nnz == int((expected != 0).sum())  # zeros dropped, nothing densified


def test_magnitude_prune_keeps_k_of_the_dense_size_per_input():
    """k = int(density · out · in) per input: 0.03 · 768 = 23 entries of the one input below."""
    merged = merge([sparse_adapter("s", 5, 0.3)], [1.0], MergeParams("magnitude_prune", density=0.03), "out")
    assert {m.sparse.nnz for m in merged.modules.values()} == {int(0.03 * OUT * IN)}


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_on_sparse_inputs_keeps_a_subset_of_the_union_rescaled(method):
    inputs = [sparse_adapter("s1", 1), sparse_adapter("s2", 2)]
    merged = merge(inputs, [1.0, 1.0], MergeParams(method, density=0.5, seed=3), "out")
    again = merge(inputs, [1.0, 1.0], MergeParams(method, density=0.5, seed=3), "out")
    full = merge(inputs, [1.0, 1.0], MergeParams(method.replace("dare_", "") if method == "dare_ties" else "linear",
                                                  density=1.0), "out")
    for key in KEYS:
        ours, reference = merged.modules[key].sparse.dense(), full.modules[key].sparse.dense()
        assert torch.equal(ours, again.modules[key].sparse.dense())  # seeded
        assert not bool(((ours != 0) & (reference == 0)).any()), "an entry outside the inputs' supports"
        assert 0 < merged.modules[key].sparse.nnz < full.modules[key].sparse.nnz


@pytest.mark.parametrize("space", ["parameter", "delta"])
def test_lora_with_sparse_inputs_give_low_rank_plus_sparse_each_part_merged_within_its_kind(space):
    rosa = lora_adapter("r", 11)
    rosa.modules = {k: LoRAModule(a=m.a, b=m.b, scale=m.scale, sparse=sparse_adapter("x", 12).modules[k].sparse)
                    for k, m in rosa.modules.items()}
    inputs = [lora_adapter("l", 10), sparse_adapter("s", 13), rosa]
    weights = [0.6, 0.9, -0.5]
    params = MergeParams("ties", density=0.3, space=space)
    merged = merge(inputs, weights, params, "out")
    assert merged.kind == "rosa"
    low_rank_only = merge([inputs[0], LoRAAdapter("empty", {}), lora_adapter("r", 11)], weights, params, "low")
    for key in KEYS:
        module, expected_low = merged.modules[key], low_rank_only.modules[key]
        low = expected_low.b @ expected_low.a * expected_low.scale
        torch.testing.assert_close(module.b @ module.a * module.scale, low)
        expected_sparse = peft_f("ties", [dense_sparse(a.modules.get(key)) for a in inputs], weights, 0.3)
        torch.testing.assert_close(module.sparse.dense(), expected_sparse, atol=1e-6, rtol=1e-6)


def test_methods_outside_the_family_still_refuse_sparse_inputs():
    inputs = [sparse_adapter("s1", 1), sparse_adapter("s2", 2)]
    with pytest.raises(LoraplexError, match="sparse parts") as info:
        merge(inputs, [1.0, 1.0], MergeParams("svd", rank=2), "out")
    assert info.value.field == "sources"
