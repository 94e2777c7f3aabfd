"""The PEFT family (linear, ties, dare_linear, dare_ties, magnitude_prune) in its two spaces.

Parameter space, as PEFT's `add_weighted_adapter`: with u_i = w_i s_i, A = f({A_i}, sign(u_i)·√|u_i|)
and B = f({B_i}, √|u_i|), each tensor pruned in its own shape, then zero-padded to the module's
largest input rank (PEFT refuses unequal ranks). ΔW = B A holds cross terms B_i A_j.
Delta space: f({ΔW_i}, w_i) on the dense updates, refactored to a rank by a dense SVD (a pruned ΔW has
no factors to start from); `linear` there is the exact sum (cat, or svd when a rank is given).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from loraplex.adapters_store.formats import LoRAAdapter, LoRAModule
from loraplex.arithmetic import prune
from loraplex.arithmetic.aligned import Key, Progress, fp32, module_keys, tracked
from loraplex.arithmetic.compose import cat, result, svd
from loraplex.arithmetic.lowrank import delta, truncate_dense
from loraplex.arithmetic.params import MergeParams


def combine(tensors: Sequence[torch.Tensor | None], weights: Sequence[float], params: MergeParams,
            shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """f of PEFT's merge_utils for `params.method` over one tensor per input (None: the input lacks it,
    a zero). Each is pruned in its own shape, then zero-padded to `shape` (its top-left corner)."""
    method, density = params.method, params.pruning_density
    stack = torch.zeros(len(tensors), *shape, device=generator.device)
    for i, tensor in enumerate(tensors):
        if tensor is None:
            continue
        if method in ("ties", "magnitude_prune"):
            tensor = prune.magnitude_prune(tensor, density)
        elif method in ("dare_linear", "dare_ties"):
            tensor = prune.random_prune(tensor, density, generator)
        stack[i, : tensor.shape[0], : tensor.shape[1]] = tensor
    w = torch.tensor(list(weights), dtype=torch.float32)
    if method in ("ties", "dare_ties"):
        return prune.ties(stack, w, params.majority_sign)
    return prune.weighted_sum(stack, w)


def parameter_space(adapters: Sequence[LoRAAdapter], weights: Sequence[float], params: MergeParams, name: str,
                    device: torch.device | None = None, progress: Progress | None = None) -> LoRAAdapter:
    generator = _generator(params.seed, device)
    modules = {}
    for key in tracked(module_keys(adapters), progress):
        inputs = [_input(adapter, key, device) for adapter in adapters]
        rank = max(m.rank for m in inputs if m is not None)
        out_features, in_features = next((m.b.shape[0], m.a.shape[1]) for m in inputs if m is not None)
        u = [w * m.scale if m is not None else 0.0 for w, m in zip(weights, inputs, strict=True)]
        a_weights = [math.copysign(math.sqrt(abs(x)), x) for x in u]
        b_weights = [math.sqrt(abs(x)) for x in u]
        a = combine([m and m.a for m in inputs], a_weights, params, (rank, in_features), generator)
        b = combine([m and m.b for m in inputs], b_weights, params, (out_features, rank), generator)
        modules[key] = LoRAModule(a=a, b=b, scale=1.0)
    return result(name, modules, adapters)


def delta_space(adapters: Sequence[LoRAAdapter], weights: Sequence[float], params: MergeParams, name: str,
                device: torch.device | None = None, progress: Progress | None = None) -> LoRAAdapter:
    if params.method == "linear":
        if params.rank is None:
            return cat(adapters, weights, name, device, progress)
        return svd(adapters, weights, params.rank, name, device, progress)
    generator = _generator(params.seed, device)
    modules = {}
    for key in tracked(module_keys(adapters), progress):
        inputs = [_input(adapter, key, device) for adapter in adapters]
        rank = params.rank or max(m.rank for m in inputs if m is not None)
        shape = next((m.b.shape[0], m.a.shape[1]) for m in inputs if m is not None)
        merged = combine([m and delta(m) for m in inputs], weights, params, shape, generator)  # [out, in]
        b, a = truncate_dense(merged, rank)
        modules[key] = LoRAModule(a=a.contiguous(), b=b.contiguous(), scale=1.0)
    return result(name, modules, adapters)


def _input(adapter: LoRAAdapter, key: Key, device) -> LoRAModule | None:
    module = adapter.modules.get(key)
    return None if module is None else fp32(module, device)


def _generator(seed: int, device: torch.device | None) -> torch.Generator:
    return torch.Generator(device=device or "cpu").manual_seed(seed)
