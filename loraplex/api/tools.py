"""Tool calls on chat: `tools` rendered through the chat template (refused when it has no tools support),
`tool_choice` "required" or a named function constraining the output through structured outputs, and
"auto" parsing the Hermes-style `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks that the
common templates (Qwen, Hermes, SmolLM) ask the model to write."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from loraplex.engine.guided import Guide
from loraplex.errors import invalid

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ToolPlan:
    """What a request's tools ask of the generation: the tools for the template, the guide that
    constrains the output (required / named), and how to read the output back."""

    tools: list[dict[str, Any]]  # as the template takes them (OpenAI's shape)
    mode: str  # "auto" | "required" | "named"
    guide: Guide | None
    name: str | None = None  # the named function

    async def compiled_guide(self, state, other: Guide | None) -> Guide:
        """The guide, compiled into the engine's cache; a 400 when the request constrains its output otherwise too."""
        if other is not None:
            raise invalid("tool_choice", f"constrains the output, and so does {other.field}; send one of them")
        engine = state.engine.engine
        await asyncio.to_thread(lambda: engine.grammars.compile(self.guide))
        return self.guide


def plan(tools: list[dict[str, Any]] | None, tool_choice: Any, template: str | None) -> ToolPlan | None:
    """None when the request uses no tools (none sent, or tool_choice "none"); LoraplexError naming the
    field when the template cannot render tools, or tool_choice names a tool not sent."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise invalid("tool_choice", "needs tools: send the tools it may call")
        return None
    if tool_choice == "none":
        return None  # the tools are not rendered either, as vLLM does with tool_choice none
    if not template or "tools" not in template:
        raise invalid("tools", "the model's chat template does not render tools (it never reads `tools`); start "
                      "the server with --chat-template pointing at a template that does, or describe the tools "
                      "in a system message")
    functions = [_function(tool, i) for i, tool in enumerate(tools)]
    if tool_choice in (None, "auto"):
        return ToolPlan(tools, "auto", None)
    if tool_choice == "required":
        items = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                             "arguments": f.get("parameters") or {"type": "object"}},
                            "required": ["name", "arguments"], "additionalProperties": False} for f in functions]}
        schema = {"type": "array", "items": items, "minItems": 1}
        return ToolPlan(tools, "required", Guide.of_schema(schema, "tools"))
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        match = [f for f in functions if f["name"] == name]
        if not match:
            raise invalid("tool_choice", f"names function {name!r}, which is not among the tools")
        parameters = match[0].get("parameters") or {"type": "object"}
        return ToolPlan(tools, "named", Guide.of_schema(parameters, "tools"), name)
    raise invalid("tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": '
                  '{"name": ...}}')


def _function(tool: dict[str, Any], index: int) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if tool.get("type") != "function" or not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise invalid("tools", f"tool {index} must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise invalid("tools", f"tool {index}: parameters must be a JSON schema (an object)")
    return function


def _call(name: str, arguments: Any) -> dict[str, Any]:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def parse(plan_: ToolPlan, text: str, finish_reason: str | None) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """(content, tool calls, finish_reason) of one choice's output."""
    if plan_.mode == "named":
        if finish_reason != "stop":
            return text, [], finish_reason  # cut short: the arguments are incomplete, returned as text
        return None, [_call(plan_.name, text)], "tool_calls"
    if plan_.mode == "required":
        if finish_reason != "stop":
            return text, [], finish_reason
        try:
            calls = json.loads(text)
        except json.JSONDecodeError:
            return text, [], finish_reason
        return None, [_call(c["name"], c["arguments"]) for c in calls], "tool_calls"
    calls = []
    for match in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            calls.append(_call(call["name"], call.get("arguments", call.get("parameters", {}))))
    if not calls:
        return text, [], finish_reason
    content = _TOOL_CALL.sub("", text)
    content = content if content.strip() else None  # as streamed: the text around the calls
    return content, calls, "tool_calls" if finish_reason == "stop" else finish_reason


def plan_tools(body, template: str | None) -> ToolPlan | None:
    """`plan` for a chat request's tools and tool_choice."""
    return plan(body.tools, body.tool_choice, template)


def tool_choices(plan_: ToolPlan, choices: list[dict[str, Any]]) -> None:
    """Turn each non-streamed choice's message into content and tool_calls, in place."""
    for choice in choices:
        message = choice["message"]
        content, calls, finish_reason = parse(plan_, message["content"], choice["finish_reason"])
        message["content"] = content
        if calls:
            message["tool_calls"] = calls
        choice["finish_reason"] = finish_reason


_TAG = "<tool_call>"


async def tool_call_chunks(plan_: ToolPlan, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """The streamed chat chunks with tool calls as OpenAI streams them: each call in one `delta.tool_calls`
    entry (index, id, type, name and its whole arguments) when the choice ends, then its finish_reason.
    With tool_choice auto, content streams until a `<tool_call>` tag starts (a tail that may be the
    start of one is held back); from there the choice's text is held until it ends and is parsed."""
    held: dict[int, str] = {}  # per choice: text not sent yet
    calling: dict[int, bool] = {}  # per choice: a tag was seen (auto), or the output is a call (required / named)
    async for chunk in chunks:
        if not chunk["choices"]:
            yield chunk
            continue
        choice = chunk["choices"][0]
        index, delta = choice["index"], choice["delta"]
        if "role" in delta:
            yield chunk
            continue
        text = held.get(index, "") + delta.get("content", "")
        finish = choice["finish_reason"]
        if plan_.mode != "auto" or _TAG in text:
            calling[index] = True
        if finish is None:
            if calling.get(index):
                held[index] = text
                continue
            keep = _partial_tag(text)
            held[index] = text[len(text) - keep:] if keep else ""
            sendable = text[: len(text) - keep]
            if not sendable:
                continue
            yield {**chunk, "choices": [{**choice, "delta": {"content": sendable}}]}
            continue
        held.pop(index, None)
        if calling.get(index):
            content, calls, finish = parse(plan_, text, finish)
        else:
            content, calls = text, []
        out_delta: dict[str, Any] = {}
        if content:
            out_delta["content"] = content
        if calls:
            out_delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
        yield {**chunk, "choices": [{**choice, "delta": out_delta, "finish_reason": finish}]}


def _partial_tag(text: str) -> int:
    """How many characters at the end of `text` may be the start of a <tool_call> tag."""
    for length in range(min(len(_TAG) - 1, len(text)), 0, -1):
        if _TAG.startswith(text[-length:]):
            return length
    return 0
