"""Per-request compositions: adapters made of registered ones by a recipe (inputs, weights, method), built
once and then served like any registered adapter. Bounded (least recently used dropped first) and dropped
when one of their inputs is unregistered or replaced."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters_store.formats import LoRAAdapter, check_norms
from loraplex.adapters_store.sparse_format import MAX_FROBENIUS
from loraplex.arithmetic import MergeParams, merge
from loraplex.errors import invalid
from loraplex.merging import Source, read_metrics

PREFIX = "~compose:"  # no adapter name starts with "~": a composition never shadows a registered adapter


@dataclass(frozen=True)
class Recipe:
    inputs: tuple[tuple[str, float], ...]  # (registered adapter name, weight)
    params: MergeParams  # cat for a linear composition
    metrics: tuple[float, ...] | None = None  # mwa: one per input
    field: str = "model"  # the request field that spelled it, for errors

    def name(self, keys: Sequence[str]) -> str:
        """The composition's name: the same recipe on the same registrations (keys) gives the same name."""
        spec = {"inputs": [[key, w] for key, (_, w) in zip(keys, self.inputs, strict=True)],
                "params": self.params.to_json(), "metrics": self.metrics}
        return PREFIX + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def builder(recipe: Recipe, read: Sequence[Callable[[], LoRAAdapter]], paths: Sequence[Path],
            max_rank: int) -> Callable[[], LoRAAdapter]:
    """A function (safe to run on any thread) that reads the inputs and builds the composition. `paths`:
    the inputs' directories, where mwa finds their trainer states when the recipe gives no metrics."""

    def build() -> LoRAAdapter:
        adapters = [load() for load in read]
        metrics = recipe.metrics
        if recipe.params.method == "mwa" and metrics is None:
            sources = [Source(name=n, path=p) for (n, _), p in zip(recipe.inputs, paths, strict=True)]
            metrics = read_metrics(sources, recipe.params)
        merged = merge(adapters, [w for _, w in recipe.inputs], recipe.params, name="composition", metrics=metrics)
        if merged.rank > max_rank:
            raise invalid(recipe.field, f"the composition has rank {merged.rank} (in a linear composition the "
                          f"inputs' ranks add up), above --max-lora-rank {max_rank}: store a lower-rank merge "
                          f"first (POST /v1/adapters/merge with method 'svd' and rank <= {max_rank}) and name it, or "
                          "restart with a larger --max-lora-rank", code="composition_rank_too_large")
        for key, module in merged.modules.items():
            where = f"the composition's layer {key[0]} {key[1]}"
            if module.rank > 0:
                check_norms(module.a, module.b, module.scale, where, field=recipe.field)
            if module.sparse is not None and not float(module.sparse.values.norm()) <= MAX_FROBENIUS:
                raise invalid(recipe.field, f"{where}: the sparse part's Frobenius norm is above {MAX_FROBENIUS:g}; "
                              "lower the weights")
        return merged

    return build


class Compositions:
    """Which compositions are registered, their inputs, and counts for /metrics."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.inputs: OrderedDict[str, frozenset[str]] = OrderedDict()  # name -> input names, LRU order
        self.hits = 0
        self.builds = 0
        self.dropped = 0  # an input was unregistered or replaced

    def __contains__(self, name: str) -> bool:
        return name in self.inputs

    def touch(self, name: str) -> bool:
        """True (and counted as a hit) when the composition is registered already."""
        if name not in self.inputs:
            return False
        self.inputs.move_to_end(name)
        self.hits += 1
        return True

    def add(self, name: str, inputs: Sequence[str]) -> list[str]:
        """Record a new composition; returns those past the capacity (the least recently used), to drop."""
        self.inputs[name] = frozenset(inputs)
        self.builds += 1
        evicted = []
        while len(self.inputs) > self.capacity:
            evicted.append(self.inputs.popitem(last=False)[0])
        return evicted

    def using(self, input_name: str) -> list[str]:
        """The compositions that use `input_name`, forgotten here (the caller unregisters them)."""
        names = [name for name, inputs in self.inputs.items() if input_name in inputs]
        for name in names:
            del self.inputs[name]
        self.dropped += len(names)
        return names

    def discard(self, name: str) -> None:
        self.inputs.pop(name, None)
