"""`merge`: one entry for every method, in fp32 on the device asked for."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraplex.adapters_store.formats import LoRAAdapter
from loraplex.arithmetic.aligned import Progress
from loraplex.arithmetic.checkpoints import copa, mwa
from loraplex.arithmetic.compose import cat, svd
from loraplex.arithmetic.params import MergeParams, check_weights
from loraplex.arithmetic.sparse_parts import has_sparse_parts, merge_with_sparse_parts
from loraplex.arithmetic.task_vectors import delta_space, parameter_space
from loraplex.errors import invalid


def merge(adapters: Sequence[LoRAAdapter], weights: Sequence[float] | None, params: MergeParams, name: str,
          device: torch.device | str | None = None, metrics: Sequence[float] | None = None,
          progress: Progress | None = None) -> LoRAAdapter:
    """Merge `adapters` by `params.method`. weights: one per adapter (None: all 1); mwa and copa take none.
    metrics: mwa's losses or steps when params.metric_values does not give them. The result's tensors are
    fp32 on `device` (default: where the inputs are). progress(done, total) is called after each module."""
    weights = check_weights([1.0] * len(adapters) if weights is None else weights, len(adapters))
    device = torch.device(device) if device is not None else None
    method = params.method
    if method in ("mwa", "copa") and any(w != 1.0 for w in weights):
        why = "the metrics weigh the checkpoints" if method == "mwa" else "it weighs entries by magnitude"
        raise invalid("weight", f"{method} takes no weights ({why}); drop them")
    if method == "cat":
        return cat(adapters, weights, name, device, progress)
    if method == "svd":
        return svd(adapters, weights, params.rank or max(a.rank for a in adapters), name, device, progress)
    if method == "mwa":
        values = params.metric_values or metrics
        if values is None or len(values) != len(adapters):
            raise invalid("metric_values", f"mwa needs one {params.metric} per adapter ({len(adapters)}): give "
                          "metric_values, or checkpoints that hold a trainer_state.json")
        return mwa(adapters, values, params, name, device, progress)
    if method == "copa":
        return copa(adapters, params, name, device, progress)
    family = delta_space if params.space == "delta" else parameter_space
    if has_sparse_parts(adapters):  # each kind of part merged within its kind (sparse_parts.py)
        return merge_with_sparse_parts(adapters, weights, params, name,
                                       lambda low_rank: family(low_rank, weights, params, name, device, progress),
                                       device, progress)
    return family(adapters, weights, params, name, device, progress)
