"""Inputs of a merge, lined up module by module: the union of their targets, shapes that agree, and one
device and dtype (fp32) to compute in."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch

from loraplex.adapters_store.formats import LoRAAdapter, LoRAModule
from loraplex.errors import invalid

Key = tuple[int, str]  # (layer, module)
Progress = Callable[[int, int], None]  # (modules done, modules in all)


def tracked(keys: list[Key], progress: Progress | None) -> Iterator[Key]:
    """The keys, reporting after each one is done."""
    for done, key in enumerate(keys, 1):
        yield key
        if progress is not None:
            progress(done, len(keys))


def module_keys(adapters: Sequence[LoRAAdapter], sparse: bool = False) -> list[Key]:
    """Every module some input adapts, in (layer, module) order; shapes checked to agree across inputs."""
    shapes: dict[Key, tuple[str, tuple[int, int]]] = {}
    for adapter in adapters:
        refuse_unmergeable(adapter, sparse)
        for key, module in adapter.modules.items():
            shape = (module.b.shape[0], module.a.shape[1])
            first = shapes.setdefault(key, (adapter.name, shape))
            if first[1] != shape:
                raise invalid("sources", f"adapter {adapter.name!r}: {module_name(key)} is {shape[0]}x{shape[1]} "
                              f"(out x in) but {first[0]!r} has it {first[1][0]}x{first[1][1]}; the adapters "
                              "were made for different base models")
    _check_base_models(adapters)
    return sorted(shapes)


def refuse_unmergeable(adapter: LoRAAdapter, sparse: bool = False) -> None:
    """DoRA inputs (their magnitudes do not add), and inputs with sparse parts unless `sparse` (the exact
    methods, scale / negate / add = cat, take them)."""
    if any(m.magnitude is not None for m in adapter.modules.values()):
        raise invalid("sources", f"adapter {adapter.name!r} is a DoRA adapter: its magnitude vectors (norms of "
                      "the updated rows) do not add or average, so it cannot be merged; merge plain LoRA adapters")
    if not sparse and any(m.sparse is not None for m in adapter.modules.values()):
        raise invalid("sources", f"adapter {adapter.name!r} has sparse parts, which svd, mwa and copa do not "
                      "take; use cat or a method of PEFT's family (linear, ties, dare_linear, dare_ties, "
                      "magnitude_prune), or merge plain LoRA adapters")


def _check_base_models(adapters: Sequence[LoRAAdapter]) -> None:
    named = [(a.name, a.config.get("base_model_name_or_path")) for a in adapters]
    named = [(n, b) for n, b in named if b]
    for name, base in named[1:]:
        if base != named[0][1]:
            raise invalid("sources", f"adapter {name!r} was trained on {base!r} but {named[0][0]!r} on "
                          f"{named[0][1]!r}; merge adapters of one base model")


def fp32(module: LoRAModule, device: torch.device | None) -> LoRAModule:
    return dataclasses.replace(module, a=module.a.to(device=device, dtype=torch.float32),
                               b=module.b.to(device=device, dtype=torch.float32))


def shape_of(adapters: Sequence[LoRAAdapter], key: Key) -> tuple[int, int]:
    for adapter in adapters:
        if key in adapter.modules:
            module = adapter.modules[key]
            return module.b.shape[0], module.a.shape[1]
    raise KeyError(key)


def padded(module: LoRAModule | None, rank: int, shape: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], B [out, rank]) of a module, zero-padded to `rank`; zeros for an input without it."""
    out_features, in_features = shape
    a = torch.zeros(rank, in_features, device=device)
    b = torch.zeros(out_features, rank, device=device)
    if module is not None:
        a[: module.rank] = module.a
        b[:, : module.rank] = module.b
    return a, b


def module_name(key: Key) -> str:
    layer, module = key
    part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{part}.{module}"
