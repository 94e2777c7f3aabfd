"""Adapter arithmetic: pure functions from parsed adapters (`LoRAAdapter`) to a new one. They know nothing
of files, HTTP or the engine. Formulas, spaces and sources: docs/merging.md."""

from loraplex.arithmetic.checkpoints import copa, mwa, mwa_weights
from loraplex.arithmetic.compose import add, cat, negate, scale, svd
from loraplex.arithmetic.lowrank import delta, truncate
from loraplex.arithmetic.merge import merge
from loraplex.arithmetic.params import METHODS, MergeParams

__all__ = ["METHODS", "MergeParams", "add", "cat", "copa", "delta", "merge", "mwa", "mwa_weights", "negate",
           "scale", "svd", "truncate"]
