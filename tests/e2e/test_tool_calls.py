"""Tool calls through the official `openai` client: tools rendered by a chat template that supports them
(a Hermes-style one, given with --chat-template), refused with a 400 by one that does not (the demo
model's own); tool_choice "required" and a named function constrain the output to the call's JSON and
return message.tool_calls with finish_reason "tool_calls"; "auto" parses <tool_call> blocks; streamed
tool calls are read back by the client's own types."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from server_harness import ADMIN_KEY, API_KEY, engine_options, run_server

from loraplex.api.tools import ToolPlan, parse
from loraplex.config import ServerConfig

HERMES = (
    "{%- if tools %}<|im_start|>system\nYou can call these tools:\n<tools>\n{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}</tools>\nAnswer with <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call>.<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{%- if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>{{ call.function | tojson }}"
    "</tool_call>{% endfor %}{% endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                             "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
USER = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("tools-home")
    template = home / "hermes.jinja"
    template.write_text(HERMES)
    config = ServerConfig(api_key=API_KEY, admin_key=ADMIN_KEY)
    with run_server(engine_options(demo_dir, home, chat_template=str(template)), config) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def assert_calls(message, names=None):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_choice_returns_valid_tool_calls(client):
    for seed in range(10):
        out = client.chat.completions.create(model="demo", messages=USER, tools=TOOLS, tool_choice="required",
                                             temperature=1.0, seed=seed, max_tokens=150)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert_calls(choice.message)


def test_a_named_function_is_called_with_valid_arguments(client):
    for seed in range(10):
        out = client.chat.completions.create(
            model="alpha", messages=USER, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=100,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
        assert_calls(choice.message)


def test_auto_parses_tool_call_blocks(client):
    """The demo model never writes a <tool_call> on its own: a regex makes it write one, which auto parses."""
    regex = r'Sure\. <tool_call>\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}</tool_call>'
    out = client.chat.completions.create(model="demo", messages=USER, tools=TOOLS, tool_choice="auto", max_tokens=80,
                                         temperature=1.0, seed=1, extra_body={"guided_regex": regex})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Sure. "  # the text around the call, as it streams
    assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
    assert_calls(choice.message)
    # without a call, auto is a plain answer
    out = client.chat.completions.create(model="demo", messages=USER, tools=TOOLS, max_tokens=8, temperature=0)
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content
    assert out.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}, "auto"])
def test_streamed_tool_calls_are_read_by_the_client(client, tool_choice):
    extra = {}
    if tool_choice == "auto":
        extra = {"guided_regex": r'Hi <tool_call>\{"name": "get_time", "arguments": \{"zone": "UTC"\}\}</tool_call>'}
    kwargs = {"model": "demo", "messages": USER, "tools": TOOLS, "tool_choice": tool_choice, "temperature": 1.0,
              "seed": 3, "max_tokens": 150, "extra_body": extra}
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [call for d in deltas for call in (d.tool_calls or [])]
    content = "".join(d.content or "" for d in deltas)
    assert [c.function.name for c in calls] == [c.function.name for c in whole.message.tool_calls]
    assert [c.function.arguments for c in calls] == [c.function.arguments for c in whole.message.tool_calls]
    assert [c.index for c in calls] == list(range(len(calls)))
    assert (content or None) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_conversation_with_tool_calls_and_results_renders(client):
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    out = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_tools_are_refused_by_a_template_without_tools_support(live_server):
    with pytest.raises(openai.BadRequestError) as info:
        live_server.client().chat.completions.create(model="demo", messages=USER, tools=TOOLS, max_tokens=4)
    assert info.value.body["param"] == "tools"
    assert "chat template does not render tools" in info.value.body["message"]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_a_400_naming_the_field(client, kwargs, field):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo", messages=USER, max_tokens=4, **kwargs)
    assert info.value.body["param"] == field, info.value.body


def test_parse_hermes_blocks():
    plan = ToolPlan(TOOLS, "auto", None)
    content, calls, finish = parse(plan, 'a <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call> b '
                                         '<tool_call>{"name": "g", "arguments": {}}</tool_call>', "stop")
    assert content == "a  b " and finish == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("f", {"x": 1}),
                                                                                                 ("g", {})]
    assert parse(plan, "no calls <tool_call>{broken", "length") == ("no calls <tool_call>{broken", [], "length")
