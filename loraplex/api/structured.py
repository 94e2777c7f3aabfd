"""Structured outputs at the API edge: the one constraint a request asks for (OpenAI's `response_format`,
vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`, or vLLM's newer
`structured_outputs`), as a `Guide`, compiled (and so checked: a bad schema is a 400 naming its field) in
a worker thread before the request is queued. The engine applies it (loraplex.engine.guided)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from loraplex.api.protocol import SamplingFields
from loraplex.api.state import ServerState
from loraplex.engine.guided import Guide
from loraplex.errors import invalid

_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
_STRUCTURED_KINDS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar",
                     "json_object": "json_object"}
# vLLM's structured_outputs options that only tune how the grammar is built: taken when off
_STRUCTURED_NOOPS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties")


def guide_of(body: SamplingFields) -> Guide | None:
    """The request's constraint, or None; LoraplexError naming the field when it is malformed or when
    the request asks for more than one."""
    guides: list[Guide] = []
    if body.response_format is not None:
        guide = _response_format(body.response_format)
        if guide is not None:
            guides.append(guide)
    for name in _GUIDED:
        value = getattr(body, name)
        if value is not None:
            guides.append(_guided(name, value))
    if body.structured_outputs is not None:
        guide = _structured_outputs(body.structured_outputs)
        if guide is not None:
            guides.append(guide)
    if len(guides) > 1:
        raise invalid(guides[1].field, f"asks for a second structured output, beside {guides[0].field}; "
                      "send one of response_format, guided_json, guided_regex, guided_choice, guided_grammar "
                      "and structured_outputs")
    return guides[0] if guides else None


async def compiled_guide(state: ServerState, body: SamplingFields) -> Guide | None:
    """`guide_of(body)`, its grammar compiled into the engine's cache off the event loop (a bad schema,
    regex or grammar raises LoraplexError naming its field)."""
    guide = guide_of(body)
    if guide is not None:
        engine = state.engine.engine
        await asyncio.to_thread(lambda: engine.grammars.compile(guide))
    return guide


def _response_format(value: dict[str, Any]) -> Guide | None:
    field = "response_format"
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Guide("json_object", "", field)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid(field, 'type "json_schema" needs json_schema: {"name": ..., "schema": {...}}')
        schema = spec.get("schema", {"type": "object"})  # OpenAI's schema is optional: then any object
        return Guide.of_schema(schema, field)
    raise invalid(field, f'type must be "text", "json_object" or "json_schema", got {kind!r}')


def _guided(name: str, value: Any) -> Guide:
    if name == "guided_json":
        return Guide.of_schema(value, name)
    if name == "guided_choice":
        return Guide.of_choice(value, name)
    if not isinstance(value, str) or not value:
        raise invalid(name, "must be a non-empty string")
    return Guide("regex" if name == "guided_regex" else "grammar", value, name)


def _structured_outputs(value: dict[str, Any]) -> Guide | None:
    field = "structured_outputs"
    for key, option in value.items():
        if option is None or key in _STRUCTURED_KINDS:
            continue
        if key in _STRUCTURED_NOOPS and option is False:
            continue
        raise invalid(field, f"{key!r} is not supported (loraplex takes json, regex, choice, grammar or "
                      "json_object)")
    kinds = [key for key in _STRUCTURED_KINDS if value.get(key) is not None and value.get(key) is not False]
    if len(kinds) > 1:
        raise invalid(field, f"asks for {' and '.join(kinds)}; send one")
    if not kinds:
        return None
    kind = kinds[0]
    option = value[kind]
    if kind == "json":
        return Guide.of_schema(option, field)
    if kind == "choice":
        return Guide.of_choice(option, field)
    if kind == "json_object":
        if option is not True:
            raise invalid(field, f"json_object must be true, got {json.dumps(option)}")
        return Guide("json_object", "", field)
    if not isinstance(option, str) or not option:
        raise invalid(field, f"{kind} must be a non-empty string")
    return Guide(kind, option, field)
