"""PEFT's family (linear, ties, dare_linear, dare_ties, magnitude_prune) on adapters with sparse parts.

Each adapter's update is split in two, ΔW_i = s_i·B_i·A_i + S_i, and each part is merged within its kind:
the low-rank parts exactly as plain LoRA adapters are (parameter or delta space, `task_vectors`), the
sparse parts by f of PEFT's `merge_utils` on the dense S_i (c_t = w_i), computed on the union of their
supports, which is exact: an entry outside every S_i is zero in each input and in the result. So sparse
inputs give a sparse result, and LoRA with sparse inputs a low-rank + sparse (RoSA-style) one.

magnitude_prune keeps k = int(density · out · in) entries per input, as on the dense matrix (an input
with fewer non-zeros keeps them all). DARE's Bernoulli draws are taken on the union only (entries
outside it are zero either way): the same distribution as on the dense matrix, not the same draws.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from loraplex.adapters_store.formats import LoRAAdapter, LoRAModule
from loraplex.adapters_store.sparse_format import SparseDelta
from loraplex.arithmetic import prune
from loraplex.arithmetic.aligned import Progress, module_keys
from loraplex.arithmetic.compose import result
from loraplex.arithmetic.params import MergeParams

LowRankMerge = Callable[[Sequence[LoRAAdapter]], LoRAAdapter]


def has_sparse_parts(adapters: Sequence[LoRAAdapter]) -> bool:
    return any(m.sparse is not None for a in adapters for m in a.modules.values())


def merge_with_sparse_parts(adapters: Sequence[LoRAAdapter], weights: Sequence[float], params: MergeParams,
                            name: str, low_rank_merge: LowRankMerge, device: torch.device | None = None,
                            progress: Progress | None = None) -> LoRAAdapter:
    """The merge of `adapters` by a method of PEFT's family, `low_rank_merge` merging their low-rank parts
    (inputs without one in a module count as zeros there, as in PEFT)."""
    keys = module_keys(adapters, sparse=True)
    low_rank = [_low_rank_part(a) for a in adapters]
    modules: dict = {}
    if any(a.modules for a in low_rank):
        modules.update(low_rank_merge(low_rank).modules)
    generator = torch.Generator(device=device or "cpu").manual_seed(params.seed)
    sparse_keys = [k for k in keys if any(k in a.modules and a.modules[k].sparse is not None for a in adapters)]
    for done, key in enumerate(sparse_keys, 1):
        parts = [a.modules[key].sparse if key in a.modules else None for a in adapters]
        merged = merge_sparse(parts, weights, params, generator, device)
        module = modules.get(key)
        if module is None:
            out_features, in_features = merged.shape
            module = LoRAModule(a=torch.zeros(0, in_features, device=device),
                                b=torch.zeros(out_features, 0, device=device), scale=1.0)
        modules[key] = dataclasses.replace(module, sparse=merged)
        if progress is not None:
            progress(done, len(sparse_keys))
    return result(name, dict(sorted(modules.items())), adapters)


def merge_sparse(parts: Sequence[SparseDelta | None], weights: Sequence[float], params: MergeParams,
                 generator: torch.Generator, device: torch.device | None = None) -> SparseDelta:
    """f({S_t}, w) of PEFT's merge_utils for `params.method`, as on the dense matrices (None: a zero input)."""
    present = [(i, p) for i, p in enumerate(parts) if p is not None]
    out_features, in_features = present[0][1].shape
    flat = []  # per present input: (flat indices row * in + col, values)
    for _, part in present:
        crow, col = part.crow.to(device), part.col.to(device)
        rows = torch.repeat_interleave(torch.arange(out_features, device=device), crow[1:] - crow[:-1])
        flat.append((rows * in_features + col, part.values.to(device=device, dtype=torch.float32)))
    union = torch.unique(torch.cat([f for f, _ in flat]))  # sorted: row-major order
    stack = torch.zeros(len(parts), union.numel(), device=device)
    for (i, _), (index, values) in zip(present, flat, strict=True):
        stack[i, torch.searchsorted(union, index)] = values
    method, density = params.method, params.pruning_density
    for i, _ in present:
        if method in ("ties", "magnitude_prune"):
            stack[i] = prune.magnitude_prune(stack[i], density, numel=out_features * in_features)
        elif method in ("dare_linear", "dare_ties"):
            stack[i] = prune.random_prune(stack[i], density, generator)
    w = torch.tensor(list(weights), dtype=torch.float32)
    merged = prune.ties(stack, w, params.majority_sign) if method in ("ties", "dare_ties") else \
        prune.weighted_sum(stack, w)
    keep = merged != 0
    index, values = union[keep], merged[keep]
    rows = index // in_features
    crow = torch.zeros(out_features + 1, dtype=torch.int64, device=index.device)
    crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    return SparseDelta(crow=crow.cpu(), col=(index % in_features).cpu(), values=values.cpu(),
                       shape=(out_features, in_features))


def _low_rank_part(adapter: LoRAAdapter) -> LoRAAdapter:
    """The adapter's low-rank modules, their sparse parts left out."""
    modules = {k: dataclasses.replace(m, sparse=None) for k, m in adapter.modules.items() if m.rank > 0}
    return dataclasses.replace(adapter, modules=modules)
