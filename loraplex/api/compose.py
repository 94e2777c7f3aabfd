"""A request's adapter: one served adapter by name, or a composition of served adapters, spelled in
`model` as an expression ("pirate*0.7+json*0.5", for any OpenAI client) or in the extra body fields
`adapters` [{name, weight}] and `merge` {method, ...}. Linear compositions are exact (the factors
concatenated); other methods are built once and cached by the engine."""

from __future__ import annotations

import math
import re

from loraplex.api.protocol import MAX_MERGE_SOURCES, MergeOptions, MergeSource, SamplingFields
from loraplex.api.state import ServerState
from loraplex.arithmetic import MergeParams
from loraplex.engine.compositions import Recipe
from loraplex.errors import LoraplexError, invalid, not_found

_TERM = re.compile(r"\s*(-?)\s*([A-Za-z0-9][A-Za-z0-9._-]{0,63})\s*(?:\*\s*([^*+\s]+)\s*)?")
_EXACT = MergeParams(method="cat")


def parse_expression(model: str) -> list[tuple[str, float]] | None:
    """'a*0.7+b*-0.5+-c' -> [(a, 0.7), (b, -0.5), (c, -1.0)]; None for a plain name (no '+' or '*')."""
    if "+" not in model and "*" not in model:
        return None
    terms = model.split("+")
    if len(terms) > MAX_MERGE_SOURCES:
        raise invalid("model", f"a composition takes at most {MAX_MERGE_SOURCES} adapters, got {len(terms)}")
    inputs = []
    for term in terms:
        match = _TERM.fullmatch(term)
        if match is None:
            raise invalid("model", f"{term.strip()!r} is not a term of a composition; write adapter or "
                          "adapter*weight terms joined by '+', e.g. 'pirate*0.7+json*0.5'")
        sign, name, weight = match.groups()
        inputs.append((name, (-1.0 if sign else 1.0) * _weight(weight)))
    return inputs


def _weight(text: str | None) -> float:
    if text is None:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        raise invalid("model", f"weight {text!r} is not a number") from None
    if not math.isfinite(value):
        raise invalid("model", f"weight {text!r} must be finite")
    return value


async def resolve_adapter(state: ServerState, body: SamplingFields) -> str | None:
    """The engine's name for the adapter a request runs on (None: the base model). 404 on an unknown name."""
    adapters: list[MergeSource] | None = body.adapters
    merge: MergeOptions | None = body.merge
    if adapters is not None:
        if body.model != state.base_name:
            raise invalid("model", f"with 'adapters', model names the base model ({state.base_name!r}), not "
                          f"{body.model!r}")
        sources, field = [(s.name, s.weight) for s in adapters], "adapters"
    else:
        parsed = parse_expression(body.model)
        if parsed is None:
            if merge is not None:
                raise invalid("merge", "needs a composition to merge: 'adapters' or a model expression")
            return state.resolve(body.model)
        sources, field = parsed, "model"
    for name, _ in sources:
        if name not in state.registry:
            raise not_found(field, f"adapter {name!r} does not exist; GET /v1/adapters lists them",
                            code="model_not_found")
    if merge is None and len(sources) == 1 and sources[0][1] == 1.0:
        return sources[0][0]  # one adapter at weight 1: itself
    params = _params(merge) if merge is not None else _EXACT
    recipe = Recipe(inputs=tuple(sources), params=params, metrics=_metrics(adapters, params), field=field)
    return await state.engine.compose(recipe)


def _params(merge: MergeOptions) -> MergeParams:
    try:
        return merge.params()
    except LoraplexError as e:  # its field is a MergeParams field: name it where the body has it
        raise invalid(f"merge.{e.field}", e.message) from None


def _metrics(adapters: list[MergeSource] | None, params: MergeParams) -> tuple[float, ...] | None:
    """MWA's metrics from the request: metric_values, or every source's loss / step (else the engine reads
    the inputs' trainer states)."""
    if params.method != "mwa":
        return None
    if params.metric_values is not None:
        return params.metric_values
    values = [getattr(s, params.metric) for s in adapters or []]
    return tuple(float(v) for v in values) if values and all(v is not None for v in values) else None
