"""Merges of adapters that share one shape: MWA (metrics-weighted averaging of the checkpoints of one
training run) and CoPA-Merging. Both work on A and B, never on ΔW."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraplex.adapters_store.formats import LoRAAdapter, LoRAModule
from loraplex.arithmetic.aligned import Key, Progress, fp32, module_name, refuse_unmergeable, tracked
from loraplex.arithmetic.compose import result
from loraplex.arithmetic.params import MergeParams
from loraplex.errors import invalid


def mwa_weights(metrics: Sequence[float], kind: str, penalty: float) -> list[float]:
    """w_i = m_i^p / Σ_j m_j^p with m_i = 1 / loss_i ("loss") or step_i ("step"); p = 0 is uniform."""
    m = torch.tensor([1.0 / v if kind == "loss" else float(v) for v in metrics], dtype=torch.float64)
    # m^p / Σ m^p computed as a softmax of p·log m: no overflow for large p
    return (penalty * m.log()).softmax(dim=0).tolist()


def mwa(adapters: Sequence[LoRAAdapter], metrics: Sequence[float], params: MergeParams, name: str,
        device: torch.device | None = None, progress: Progress | None = None) -> LoRAAdapter:
    """θ = Σ_i w_i θ_i over every A and B, with the run's scale (an input whose scale differs has
    s_i / s_0 folded into its B first)."""
    weights = mwa_weights(metrics, params.metric, params.penalty)
    modules = {}
    for key in tracked(same_shapes(adapters, "mwa"), progress):
        inputs = [fp32(adapter.modules[key], device) for adapter in adapters]
        s0 = inputs[0].scale
        a = sum(w * m.a for w, m in zip(weights, inputs, strict=True))
        b = sum(w * (m.scale / s0) * m.b for w, m in zip(weights, inputs, strict=True))
        modules[key] = LoRAModule(a=a, b=b, scale=s0)
    return result(name, modules, adapters)


def copa(adapters: Sequence[LoRAAdapter], params: MergeParams, name: str,
         device: torch.device | None = None, progress: Progress | None = None) -> LoRAAdapter:
    """CoPA-Merging (RobustMerge): per module and input, keep the top keep_ratio of A and of B by magnitude;
    row scales s_t,j = Σ|A_t[j]| / Σ|Â_t[j]| (1 where the pruned row is all zero), raised to their
    (1 - clamp_ratio) quantile; A* = Σ_t f·Â_t, B*[:, j] = Σ_t f·s_t,j·B̂_t[:, j] / Σ_t s_t,j; scale s_0."""
    modules = {}
    f = params.fuse_weight
    for key in tracked(same_shapes(adapters, "copa"), progress):
        inputs = [fp32(adapter.modules[key], device) for adapter in adapters]
        s0 = inputs[0].scale
        a_kept = [_keep_top(m.a, params.keep_ratio) for m in inputs]
        b_kept = [_keep_top(m.b * (m.scale / s0), params.keep_ratio) for m in inputs]
        row_scales = torch.stack([_row_scale(m.a, a, params.clamp_ratio) for m, a in zip(inputs, a_kept, strict=True)])
        a = f * torch.stack(a_kept).sum(dim=0)
        b = f * (row_scales.unsqueeze(1) * torch.stack(b_kept)).sum(dim=0) / row_scales.sum(dim=0)
        modules[key] = LoRAModule(a=a, b=b, scale=s0)
    return result(name, modules, adapters)


def _keep_top(x: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Zero the smallest int((1 - keep_ratio)·N) magnitudes: keep |x| >= the k-th smallest (ties kept)."""
    k = int((1 - keep_ratio) * x.numel())
    if k < 1:
        return x
    threshold = x.abs().reshape(-1).kthvalue(k).values
    return x * (x.abs() >= threshold)


def _row_scale(a: torch.Tensor, kept: torch.Tensor, clamp_ratio: float) -> torch.Tensor:
    """[rank]: how much of each row's L1 mass pruning removed, Σ|A[j]| / Σ|Â[j]| (>= 1), raised to the
    (1 - clamp_ratio) quantile. A row pruned to zeros gets 1: its Â row adds nothing, and a 0 denominator
    would be inf / NaN."""
    whole, left = a.abs().sum(dim=1), kept.abs().sum(dim=1)
    scale = torch.where(left > 0, whole / left.clamp(min=torch.finfo(a.dtype).tiny), torch.ones_like(whole))
    floor = scale.sort().values[min(int((1 - clamp_ratio) * scale.numel()), scale.numel() - 1)]
    return scale.clamp(min=floor)


def same_shapes(adapters: Sequence[LoRAAdapter], method: str) -> list[Key]:
    """The modules of the first input, which every input must have at the same rank and shape."""
    first = adapters[0]
    for adapter in adapters:
        refuse_unmergeable(adapter)
    for adapter in adapters[1:]:
        if set(adapter.modules) != set(first.modules):
            missing = sorted(set(first.modules) ^ set(adapter.modules))[0]
            raise invalid("sources", f"{method} merges adapters of one shape, but only one of {first.name!r} and "
                          f"{adapter.name!r} adapts {module_name(missing)}")
        for key, module in adapter.modules.items():
            ref = first.modules[key]
            if module.a.shape != ref.a.shape or module.b.shape != ref.b.shape:
                raise invalid("sources", f"{method} merges adapters of one shape, but {module_name(key)} has rank "
                              f"{module.rank} in {adapter.name!r} and {ref.rank} in {first.name!r} (or other "
                              "shapes): use cat, svd or linear for adapters of different shapes")
    return sorted(first.modules)
