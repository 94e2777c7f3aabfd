"""Exact composition in ΔW: scale, negate, add (= cat, ranks add up) and svd (that sum at a lower rank)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from loraplex.adapters_store.formats import LoRAAdapter, LoRAModule
from loraplex.adapters_store.sparse_format import SparseDelta
from loraplex.arithmetic.aligned import Progress, fp32, module_keys, tracked
from loraplex.arithmetic.lowrank import truncate


def result(name: str, modules: dict, inputs: Sequence[LoRAAdapter]) -> LoRAAdapter:
    """A merge's output: the modules, and the base model its inputs name (if any)."""
    base = next((a.config.get("base_model_name_or_path") for a in inputs if a.config.get("base_model_name_or_path")),
                None)
    return LoRAAdapter(name=name, modules=modules, config={"base_model_name_or_path": base} if base else {})


def scale(adapter: LoRAAdapter, weight: float, name: str | None = None) -> LoRAAdapter:
    """Every module's ΔW times `weight` (the factors untouched; the weight joins the module's scale, and
    multiplies a sparse part's values)."""
    modules = {key: dataclasses.replace(m, scale=m.scale * weight, sparse=None if m.sparse is None else
                                        scaled_sparse(m.sparse, weight)) for key, m in adapter.modules.items()}
    return LoRAAdapter(name=name or adapter.name, modules=modules, config=dict(adapter.config))


def negate(adapter: LoRAAdapter, name: str | None = None) -> LoRAAdapter:
    """ΔW -> -ΔW."""
    return scale(adapter, -1.0, name)


def stacked(adapters: Sequence[LoRAAdapter], weights: Sequence[float], key,
            device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, ΣR], A [ΣR, in]) with B @ A = Σ_i w_i s_i B_i A_i over the inputs that adapt `key`."""
    bs, as_ = [], []
    for adapter, weight in zip(adapters, weights, strict=True):
        module = adapter.modules.get(key)
        if module is not None:
            module = fp32(module, device)
            bs.append(module.b * (weight * module.scale))
            as_.append(module.a)
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def cat(adapters: Sequence[LoRAAdapter], weights: Sequence[float], name: str,
        device: torch.device | None = None, progress: Progress | None = None) -> LoRAAdapter:
    """ΔW = Σ_i w_i ΔW_i exactly: A stacks the inputs' A's, B joins their B's with w_i s_i folded in; the
    module's rank is the sum of the inputs' ranks, its scale 1. Sparse parts add up entry by entry
    (Σ_i w_i S_i, still sparse): LoRA and sparse inputs together give a low-rank + sparse (RoSA-style)
    result."""
    modules = {}
    for key in tracked(module_keys(adapters, sparse=True), progress):
        b, a = stacked(adapters, weights, key, device)
        parts = [(w, adapter.modules[key].sparse) for adapter, w in zip(adapters, weights, strict=True)
                 if key in adapter.modules and adapter.modules[key].sparse is not None]
        modules[key] = LoRAModule(a=a, b=b, scale=1.0, sparse=summed_sparse(parts) if parts else None)
    return result(name, modules, adapters)


add = cat


def svd(adapters: Sequence[LoRAAdapter], weights: Sequence[float], rank: int, name: str,
        device: torch.device | None = None, progress: Progress | None = None) -> LoRAAdapter:
    """The best rank-`rank` approximation of Σ_i w_i ΔW_i per module (Eckart–Young), computed from the
    factors: QR of the stacked B's and A's, then an SVD of the small core (`lowrank.truncate`)."""
    modules = {}
    for key in tracked(module_keys(adapters), progress):
        b, a = truncate(*stacked(adapters, weights, key, device), rank)
        modules[key] = LoRAModule(a=a.contiguous(), b=b.contiguous(), scale=1.0)
    return result(name, modules, adapters)


def scaled_sparse(delta: SparseDelta, weight: float) -> SparseDelta:
    return dataclasses.replace(delta, values=delta.values * weight)


def summed_sparse(parts: Sequence[tuple[float, SparseDelta]]) -> SparseDelta:
    """Σ w_i S_i as one CSR matrix over the union of the patterns (never dense); entries that cancel to
    zero are dropped."""
    shape = parts[0][1].shape
    coos = [w * d.to_torch(dtype=torch.float32).to_sparse_coo() for w, d in parts]
    total = torch.sparse_coo_tensor(torch.cat([c.indices() for c in coos], dim=1),
                                    torch.cat([c.values() for c in coos]), shape).coalesce()
    keep = total.values() != 0
    total = torch.sparse_coo_tensor(total.indices()[:, keep], total.values()[keep], shape, is_coalesced=True)
    csr = total.to_sparse_csr()
    return SparseDelta(crow=csr.crow_indices().long(), col=csr.col_indices().long(), values=csr.values().float(),
                       shape=shape)
