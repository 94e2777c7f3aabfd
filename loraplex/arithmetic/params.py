"""MergeParams: a merge's method and its parameters, checked once (typed errors naming the field)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from loraplex.errors import invalid

# Exact in ΔW: cat (ranks add up) and svd (that sum refactored to a rank). PEFT's parameter-space family,
# also in delta space. Checkpoint averaging (MWA) and CoPA, in parameter space as their papers define them.
METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "mwa", "copa")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SPACES = ("parameter", "delta")
MAJORITY_SIGNS = ("total", "frequency")
METRICS = ("loss", "step")
MAX_INPUTS = 64


@dataclass(frozen=True)
class MergeParams:
    method: str
    space: str = "parameter"  # linear / ties / dare_* / magnitude_prune: on A and B (PEFT) or on ΔW
    density: float | None = None  # ties, dare_*, magnitude_prune: fraction kept, in (0, 1]; default 1 (none pruned)
    rank: int | None = None  # svd (default: the largest input rank); delta space: the result's rank
    majority_sign: str = "total"  # ties, dare_ties: elect the sign by the sum of values or by their count
    seed: int = 0  # dare_*: the drop masks
    metric: str = "loss"  # mwa: weight by 1 / loss or by step
    metric_values: tuple[float, ...] | None = None  # mwa: one per input; None: from each input's trainer state
    penalty: float = 1.0  # mwa: p in w_i = m_i^p / sum_j m_j^p; 0 is the uniform mean
    keep_ratio: float = 0.2  # copa: fraction of each matrix kept by magnitude
    clamp_ratio: float = 0.2  # copa: the row scales are raised to their (1 - clamp_ratio) quantile
    fuse_weight: float = 2.0  # copa: the merged matrices' factor

    def __post_init__(self) -> None:
        _check(self.method in METHODS, "method", f"unknown method {self.method!r}; one of {', '.join(METHODS)}")
        _check(self.space in SPACES, "space", f"must be 'parameter' or 'delta', got {self.space!r}")
        if self.density is not None:
            _check(_number(self.density) and 0 < self.density <= 1, "density",
                   f"must be in (0, 1] (the fraction of entries kept), got {self.density!r}")
        if self.rank is not None:
            _check(_integer(self.rank) and self.rank >= 1, "rank", f"must be a positive integer, got {self.rank!r}")
        _check(self.majority_sign in MAJORITY_SIGNS, "majority_sign",
               f"must be 'total' or 'frequency', got {self.majority_sign!r}")
        _check(_integer(self.seed) and 0 <= self.seed < 2**63, "seed",
               f"must be a non-negative integer, got {self.seed!r}")
        _check(self.metric in METRICS, "metric", f"must be 'loss' or 'step', got {self.metric!r}")
        if self.metric_values is not None:
            _check(all(_number(v) and v > 0 for v in self.metric_values), "metric_values",
                   "must be positive finite numbers (losses or steps), one per input")
        _check(_number(self.penalty) and self.penalty >= 0, "penalty", f"must be a number >= 0, got {self.penalty!r}")
        for name in ("keep_ratio", "clamp_ratio"):
            value = getattr(self, name)
            _check(_number(value) and 0 < value <= 1, name, f"must be in (0, 1], got {value!r}")
        _check(_number(self.fuse_weight), "fuse_weight", f"must be a finite number, got {self.fuse_weight!r}")
        _check(not (self.method in ("mwa", "copa") and self.space == "delta"), "space",
               f"{self.method} is defined in parameter space (on A and B); drop space='delta'")

    @property
    def pruning_density(self) -> float:
        return 1.0 if self.density is None else self.density

    def to_json(self) -> dict:
        """The parameters that bear on this method, for a recipe."""
        out: dict = {"method": self.method}
        if self.method in ("linear", *PRUNING):
            out["space"] = self.space
        if self.method in PRUNING:
            out["density"] = self.pruning_density
        if self.method in ("ties", "dare_ties"):
            out["majority_sign"] = self.majority_sign
        if self.method.startswith("dare"):
            out["seed"] = self.seed
        if self.method == "svd" or self.space == "delta" or self.rank is not None:
            out["rank"] = self.rank
        if self.method == "mwa":
            out.update(metric=self.metric, penalty=self.penalty,
                       metric_values=None if self.metric_values is None else list(self.metric_values))
        if self.method == "copa":
            out.update(keep_ratio=self.keep_ratio, clamp_ratio=self.clamp_ratio, fuse_weight=self.fuse_weight)
        return out


def check_weights(weights: Sequence[float], count: int) -> list[float]:
    _check(1 <= count <= MAX_INPUTS, "sources", f"must name 1 to {MAX_INPUTS} adapters, got {count}")
    _check(len(weights) == count, "weights", f"must give one weight per adapter: {len(weights)} for {count}")
    _check(all(_number(w) for w in weights), "weight", "must be finite numbers (negative ones subtract)")
    return [float(w) for w in weights]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise invalid(name, message)
