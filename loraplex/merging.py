"""Merges from and to adapter directories: read the inputs, take MWA's metrics from their trainer
states, merge (loraplex.arithmetic), write a PEFT directory and its `merge_recipe.json`. Shared by
`loraplex merge` and the server's POST /v1/adapters/merge."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import loraplex
from loraplex.adapters_store.checksums import file_sha256
from loraplex.adapters_store.formats import MAX_CONFIG_RANK, WEIGHTS_FILE, LoRAAdapter, load_peft_lora
from loraplex.adapters_store.peft_export import module_path, weights_dtype, write_peft_lora, write_rosa
from loraplex.adapters_store.sparse_format import write_sparse_delta
from loraplex.adapters_store.trainer_state import read_trainer_metrics
from loraplex.arithmetic import MergeParams, merge, mwa_weights
from loraplex.errors import LoraplexError, invalid
from loraplex.models.model_config import ModelConfig

RECIPE_FILE = "merge_recipe.json"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    name: str  # how the recipe names it: a registered adapter's name, or a directory
    path: Path
    weight: float = 1.0
    loss: float | None = None  # mwa metrics given for this input; else read from its trainer_state.json
    step: int | None = None
    sha256: str | None = None  # of its weights file, when known: the file read must match it


def merge_directories(sources: Sequence[Source], params: MergeParams, output: Path,
                      base: ModelConfig | None = None, max_rank: int = MAX_CONFIG_RANK,
                      device: torch.device | str | None = None, progress: Progress | None = None) -> dict:
    """Merge the adapters in `sources` into a PEFT directory at `output` (which must not exist, or be
    empty). Returns the recipe written beside it. Refusals are LoraplexError naming the input."""
    say = progress or (lambda message: None)
    start = time.perf_counter()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise invalid("output", f"{output} exists and is not an empty directory; name a new one")
    adapters = []
    for i, source in enumerate(sources):
        say(f"reading {i + 1}/{len(sources)}: {source.name}")
        adapters.append(_read(source, base, max_rank))
    metrics = read_metrics(sources, params) if params.method == "mwa" else None
    say(f"merging {len(adapters)} adapters ({params.method}, {sum(len(a.modules) for a in adapters)} modules)")
    with tqdm(desc="merging", unit="module", disable=progress is None, file=sys.stderr) as bar:
        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        merged = merge(adapters, [s.weight for s in sources], params, name=output.name, device=device,
                       metrics=metrics, progress=advance)
    if merged.rank > max_rank:
        raise invalid("rank", f"the merged adapter has rank {merged.rank}, above the {max_rank} served "
                      f"(--max-lora-rank); merge with method 'svd' and rank <= {max_rank}, or use fewer inputs")
    dtypes = {weights_dtype(s.path) for s in sources}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    say(f"writing {output} ({str(dtype).removeprefix('torch.')})")
    _write(merged, output, dtype, base)
    recipe = make_recipe(params, sources, adapters, metrics)
    (output / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    say(f"done in {time.perf_counter() - start:.1f} s: rank {merged.rank}, {len(merged.modules)} modules")
    return recipe


def _write(merged: LoRAAdapter, output: Path, dtype: torch.dtype, base: ModelConfig | None) -> None:
    """A PEFT directory (named as the base model names its modules), or a sparse delta when every module is
    sparse alone."""
    if not any(m.sparse is not None for m in merged.modules.values()):
        write_peft_lora(merged, output, dtype, base=base)
        return
    if any(m.rank > 0 for m in merged.modules.values()):
        write_rosa(merged, output, dtype)  # low-rank + sparse
        return
    if merged.nnz == 0:
        raise invalid("sources", "every entry of the merged sparse delta is zero (the inputs cancel out, or the "
                      "density keeps none): there is no adapter to write")
    write_sparse_delta({module_path(*key): m.sparse for key, m in merged.modules.items()}, output,
                       merged.config.get("base_model_name_or_path"), dtype)


def make_recipe(params: MergeParams, sources: Sequence[Source], adapters: Sequence[LoRAAdapter],
                metrics: Sequence[float] | None) -> dict:
    inputs = []
    for i, (source, adapter) in enumerate(zip(sources, adapters, strict=True)):
        entry = {"name": source.name, "weight": source.weight, "sha256": adapter.sha256}
        if metrics is not None:
            entry[params.metric] = metrics[i]
            entry["mwa_weight"] = mwa_weights(metrics, params.metric, params.penalty)[i]
        inputs.append(entry)
    return {"loraplex_version": loraplex.__version__, **params.to_json(), "inputs": inputs}


def _read(source: Source, base: ModelConfig | None, max_rank: int) -> LoRAAdapter:
    weights = source.path / WEIGHTS_FILE
    digest = file_sha256(weights)[0] if weights.is_file() else None
    if source.sha256 is not None and digest != source.sha256:
        raise invalid("sources", f"adapter {source.name!r}: its weights changed on disk since it was registered "
                      "(sha256 differs); upload it again")
    try:
        return load_peft_lora(source.path, source.name, base, max_rank, sha256=digest)
    except LoraplexError as e:
        raise invalid("sources", f"adapter {source.name!r}: {e.field}: {e.message}") from None


def read_metrics(sources: Sequence[Source], params: MergeParams) -> list[float] | None:
    """MWA's metric per input: params.metric_values, else each source's own, else its trainer state."""
    if params.metric_values is not None:
        return list(params.metric_values)
    values = []
    for source in sources:
        value = source.loss if params.metric == "loss" else source.step
        if value is None:
            state = read_trainer_metrics(source.path)
            value = None if state is None else (state.loss if params.metric == "loss" else state.step)
        if value is None:
            raise invalid("metric_values", f"adapter {source.name!r} has no {params.metric}: give metric_values "
                          "(--metric-values) or a checkpoint with a trainer_state.json that logs it")
        values.append(float(value))
    return values
