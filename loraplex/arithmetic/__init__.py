"""Adapter arithmetic: pure functions from parsed adapters (`LoRAAdapter`) to a new one. They know nothing
of files, HTTP or the engine. Formulas, spaces and sources: docs/merging.md."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from loraplex.arithmetic.params import METHODS, MergeParams  # torch-free: the CLI's parser reads METHODS

# The functions load torch: imported on first use, so that `loraplex --help` needs no torch.
_EXPORTS = {
    "copa": "checkpoints", "mwa": "checkpoints", "mwa_weights": "checkpoints",
    "add": "compose", "cat": "compose", "negate": "compose", "scale": "compose", "svd": "compose",
    "delta": "lowrank", "truncate": "lowrank", "merge": "methods",  # (not merge.py: a submodule named like
    # the function would shadow it once imported)
}
__all__ = ["METHODS", "MergeParams", "add", "cat", "copa", "delta", "merge", "mwa", "mwa_weights", "negate",
           "scale", "svd", "truncate"]

if TYPE_CHECKING:
    from loraplex.arithmetic.checkpoints import copa, mwa, mwa_weights
    from loraplex.arithmetic.compose import add, cat, negate, scale, svd
    from loraplex.arithmetic.lowrank import delta, truncate
    from loraplex.arithmetic.methods import merge


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"loraplex.arithmetic.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'loraplex.arithmetic' has no attribute {name!r}")
