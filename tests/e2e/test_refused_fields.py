"""Request fields of OpenAI's and vLLM's APIs that loraplex does not implement are never ignored when they
would change the output: a 400 naming the field (docs/api.md, "What is refused, and why"). Their no-op
values are taken, since clients send defaults; fields that change nothing generated are taken; a body
that is not JSON says where it breaks. Judged by the official `openai` client (extra_body) and raw HTTP.

The lists below are written from OpenAI's API reference and vLLM's request models, not read from
loraplex's table, so that a field dropped from the table fails here.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from server_harness import API_KEY

USER = [{"role": "user", "content": "Tell me about lighthouses."}]
GREEDY = {"max_tokens": 3, "temperature": 0}
EXACT = {"ignore_eos": True}
CHAT, COMPLETIONS = "chat", "completions"
BOTH = (COMPLETIONS, CHAT)

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}

# (field, endpoints, a value that changes the output, no-op values that must be taken)
REFUSED = [
    # OpenAI's
    ("best_of", BOTH, 3, [1, None]),
    ("echo", (CHAT,), True, [False, None]),  # completions' echo is implemented
    ("suffix", (COMPLETIONS,), " and so on.", [None]),
    # (tools and tool_choice are implemented: tests/e2e/test_tool_calls.py)
    ("functions", (CHAT,), [TOOL["function"]], [[], None]),
    ("function_call", (CHAT,), {"name": "lookup"}, ["none", "auto", None]),
    ("audio", (CHAT,), {"voice": "alloy", "format": "wav"}, [None]),
    ("modalities", (CHAT,), ["text", "audio"], [["text"], None]),
    ("web_search_options", (CHAT,), {}, [None]),
    ("reasoning_effort", (CHAT,), "high", [None]),
    ("verbosity", (CHAT,), "low", ["medium", None]),
    ("moderation", (CHAT,), {"model": "omni-moderation-latest"}, [None]),
    # vLLM's sampling parameters
    ("use_beam_search", BOTH, True, [False, None]),
    ("length_penalty", BOTH, 0.5, [1.0, 1, None]),
    ("truncate_prompt_tokens", BOTH, 8, [None]),
    ("prompt_logprobs", BOTH, 1, [None]),
    ("allowed_token_ids", BOTH, [5, 6, 7], [None]),
    ("bad_words", BOTH, ["light"], [[], None]),
    ("logits_processors", BOTH, ["my_module.MyProcessor"], [[], None]),
    ("max_repetition_pattern_size", BOTH, 4, [0, None]),
    ("min_repetition_pattern_size", BOTH, 2, [0, None]),
    ("repetition_min_count", BOTH, 3, [0, None]),
    # vLLM's structured output
    # (response_format, guided_json, guided_regex, guided_choice, guided_grammar and structured_outputs are
    # implemented: tests/e2e/test_structured_outputs.py)
    ("structural_tag", BOTH, '{"structures": []}', [None]),
    ("guided_decoding_backend", BOTH, "outlines", ["xgrammar", "auto", None]),
    ("guided_whitespace_pattern", BOTH, r"[\n ]*", [None]),
    # vLLM's prompt and response options
    ("add_special_tokens", (CHAT,), True, [False, None]),
    ("add_special_tokens", (COMPLETIONS,), False, [True, None]),
    ("prompt_embeds", (COMPLETIONS,), ["AAAA"], [[], None]),
    ("include_reasoning", (CHAT,), False, [True, None]),
    ("return_tokens_as_token_ids", BOTH, True, [False, None]),
    ("return_token_ids", BOTH, True, [False, None]),
    ("kv_transfer_params", BOTH, {"do_remote_prefill": True}, [None]),
    ("vllm_xargs", BOTH, {"my_extension": 1}, [{}, None]),
    ("cache_salt", BOTH, "a-secret-salt", [None]),
    # vLLM's chat template options
    ("chat_template", (CHAT,), "{{ messages[0]['content'] }}", [None]),
    ("documents", (CHAT,), [{"title": "Lighthouses", "text": "They are tall."}], [[], None]),
    ("mm_processor_kwargs", (CHAT,), {"num_crops": 4}, [{}, None]),
]

# Fields that change nothing generated: taken with a value that is not their default.
ACCEPTED = [
    ("user", "user-1234"),
    ("safety_identifier", "hashed-user"),
    ("service_tier", "flex"),
    ("store", True),
    ("metadata", {"team": "search"}),
    ("prompt_cache_key", "conversation-7"),
    ("prompt_cache_retention", "24h"),
    ("prompt_cache_options", {"ttl": "1h"}),
    ("prediction", {"type": "content", "content": "Lighthouses are tall towers."}),
    ("parallel_tool_calls", False),
    ("priority", 5),
    ("request_id", "client-request-1"),
    ("spaces_between_special_tokens", False),
    ("a_field_no_one_defines", {"nested": [1, 2]}),  # unknown: ignored, as OpenAI does
]


def cases(table):
    return [pytest.param(field, endpoint, value, extra, id=f"{endpoint}-{field}")
            for field, endpoints, value, extra in table for endpoint in endpoints]


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return live_server.client()


def create(client: openai.OpenAI, endpoint: str, extra_body: dict, **kwargs):
    """One request through the official client; returns the generated text."""
    if endpoint == COMPLETIONS:
        out = client.completions.create(model="demo", prompt="Lighthouses are", extra_body=extra_body,
                                        **{**GREEDY, **kwargs})
        return out.choices[0].text
    out = client.chat.completions.create(model="demo", messages=USER, extra_body=extra_body, **{**GREEDY, **kwargs})
    return out.choices[0].message.content


@pytest.fixture(scope="module")
def baseline(client) -> dict[str, str]:
    """Each endpoint's greedy text with nothing extra: what a no-op value must leave unchanged."""
    return {endpoint: create(client, endpoint, EXACT) for endpoint in BOTH}


def assert_refused(info: pytest.ExceptionInfo, field: str) -> None:
    error = info.value.body
    assert info.value.status_code == 400
    assert error["param"] == field, error
    assert error["type"] == "invalid_request_error", error
    message = error["message"]
    assert message.startswith(f"{field}: not supported yet"), message
    assert "omit it" in message, f"the message must say what to do instead: {message}"


@pytest.mark.parametrize(("field", "endpoint", "value", "noops"), cases(REFUSED))
def test_a_field_that_would_change_the_output_is_refused(client, field, endpoint, value, noops):
    with pytest.raises(openai.BadRequestError) as info:
        create(client, endpoint, {**EXACT, field: value})
    assert_refused(info, field)


@pytest.mark.parametrize(("field", "endpoint", "value", "noops"), cases(REFUSED))
def test_the_no_op_values_of_a_refused_field_are_taken(client, baseline, field, endpoint, value, noops):
    for noop in noops:
        assert create(client, endpoint, {**EXACT, field: noop}) == baseline[endpoint], (field, noop)


@pytest.mark.parametrize("endpoint", BOTH)
def test_refused_fields_are_refused_when_streaming_too(client, endpoint):
    with pytest.raises(openai.BadRequestError) as info:
        create(client, endpoint, {"use_beam_search": True}, stream=True)
    assert_refused(info, "use_beam_search")


@pytest.mark.parametrize("endpoint", BOTH)
def test_best_of_equal_to_n_is_taken(client, endpoint):
    """best_of n of n sequences is every sequence: the same as n alone."""
    kwargs = {"n": 2, "max_tokens": 3, "temperature": 0}
    if endpoint == COMPLETIONS:
        out = client.completions.create(model="demo", prompt="x", extra_body={"best_of": 2, **EXACT}, **kwargs)
    else:
        out = client.chat.completions.create(model="demo", messages=USER, extra_body={"best_of": 2, **EXACT}, **kwargs)
    assert len(out.choices) == 2
    with pytest.raises(openai.BadRequestError) as info:
        create(client, endpoint, {"best_of": 3}, n=2)
    assert_refused(info, "best_of")


@pytest.mark.parametrize(("field", "value"), [("length_penalty", True), ("max_repetition_pattern_size", False),
                                              ("repetition_min_count", "0"), ("use_beam_search", 0)])
def test_a_no_op_must_be_the_value_itself_not_a_lookalike(client, field, value):
    """`true` is not the number 1, `false` not 0, "0" not 0, 0 not false."""
    with pytest.raises(openai.BadRequestError) as info:
        create(client, COMPLETIONS, {field: value})
    assert_refused(info, field)


def test_with_several_refused_fields_one_of_them_is_named(client):
    with pytest.raises(openai.BadRequestError) as info:
        create(client, CHAT, {"bad_words": ["light"], "length_penalty": 0.5})
    assert info.value.body["param"] in ("bad_words", "length_penalty")
    assert_refused(info, info.value.body["param"])


def test_fields_of_the_other_endpoint_are_ignored(client, baseline):
    """`tools` and `suffix` are no fields of completions and chat respectively: ignored, like any unknown field."""
    assert create(client, COMPLETIONS, {**EXACT, "tools": [TOOL]}) == baseline[COMPLETIONS]
    assert create(client, CHAT, {**EXACT, "suffix": " the end"}) == baseline[CHAT]


@pytest.mark.parametrize("endpoint", BOTH)
def test_continuous_usage_stats_is_refused(client, endpoint):
    with pytest.raises(openai.BadRequestError) as info:
        list(create(client, endpoint, {}, stream=True,
                    stream_options={"include_usage": True, "continuous_usage_stats": True}))
    error = info.value.body
    assert error["param"] == "stream_options.continuous_usage_stats", error
    assert error["message"].startswith("stream_options.continuous_usage_stats: not supported yet"), error
    assert "omit it" in error["message"], error


@pytest.mark.parametrize(("field", "value"), ACCEPTED, ids=[f for f, _ in ACCEPTED])
@pytest.mark.parametrize("endpoint", BOTH)
def test_a_field_that_changes_nothing_generated_is_taken(client, baseline, endpoint, field, value):
    assert create(client, endpoint, {**EXACT, field: value}) == baseline[endpoint]


# ---------------------------------------------------------------------------------------------
# A body that is not JSON: a 400 that says where, with no field named
# ---------------------------------------------------------------------------------------------

TRAILING_COMMA = b'{"model": "demo", "prompt": "a", "max_tokens": 1,}'
TRUNCATED = b'{"model": "demo", "prompt": "a"'
SECOND_LINE = b'{"model": "demo",\n "prompt": \'a\'}'
NOT_UTF8 = b'{"model": "demo", "prompt": "caf\xe9", "max_tokens": 1}'
LATIN1_AT = NOT_UTF8.index(b"\xe9")

BAD_JSON = [
    ("trailing-comma", TRAILING_COMMA, [f"line 1 column {TRAILING_COMMA.index(b',}') + 2}",
                                        f"character {TRAILING_COMMA.index(b',}') + 1}"]),
    ("truncated", TRUNCATED, [f"line 1 column {len(TRUNCATED) + 1}", f"character {len(TRUNCATED)}"]),
    ("second-line", SECOND_LINE, ["line 2 column 12"]),
    ("empty", b"", ["line 1 column 1", "character 0"]),
    ("not-utf8", NOT_UTF8, ["UTF-8", f"line 1 column {LATIN1_AT + 1}", f"byte {LATIN1_AT}"]),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("raw", "where"), [pytest.param(raw, where, id=name) for name, raw, where in BAD_JSON])
def test_a_body_that_is_not_json_is_a_400_saying_where(live_server, path, raw, where):
    r = httpx.post(live_server.url + path, content=raw, timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] is None, error
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("the body is not valid JSON: "), error
    for part in where:
        assert part in error["message"], (part, error["message"])


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"a prompt"', b"null", b"42"])
def test_a_body_that_is_not_a_json_object_is_a_400(live_server, raw):
    r = httpx.post(f"{live_server.url}/v1/completions", content=raw, timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] is None and error["message"].startswith("the body must be a JSON object"), error
