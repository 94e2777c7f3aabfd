"""OpenAI API conformance of the live server, judged by the official `openai` client and raw HTTP.

Written from the OpenAI API reference and the client's typed models (and the promises of docs/api.md),
not from the server's code. The demo model has random weights: its text is gibberish, but greedy
decoding (temperature 0) is deterministic, and `ignore_eos` gives an exact number of tokens.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from server_harness import ADMIN_KEY, API_KEY

ADAPTERS = ("alpha", "beta", "gamma")
EXACT = {"ignore_eos": True}
USER = [{"role": "user", "content": "Tell me a story about a lighthouse."}]
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return live_server.client()


def headers(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_error_shape(response, status: int) -> dict:
    """The response is an OpenAI error: the status, a JSON body {"error": {message, type, param, code}}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) >= ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], (str, int)), error
    return error


def assert_recent(created) -> None:
    assert type(created) is int, created
    assert abs(created - time.time()) < 3600, created


# ---------------------------------------------------------------------------------------------
# Response objects
# ---------------------------------------------------------------------------------------------


def assert_one_choice(out, cls, obj: str, model: str):
    """The response's envelope and usage (5 tokens at most were asked for); returns its only choice."""
    assert isinstance(out, cls)
    assert out.object == obj
    assert isinstance(out.id, str) and out.id
    assert_recent(out.created)
    assert out.model == model
    assert len(out.choices) == 1
    choice = out.choices[0]
    assert choice.index == 0
    assert choice.finish_reason in ("stop", "length")
    assert choice.logprobs is None
    assert out.usage is not None and out.usage.prompt_tokens > 0
    assert 1 <= out.usage.completion_tokens <= 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    return choice


@pytest.mark.parametrize("model", ["demo", "alpha"])
def test_completion_object(client, model):
    out = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0)
    choice = assert_one_choice(out, Completion, "text_completion", model)
    assert isinstance(choice.text, str)


@pytest.mark.parametrize("model", ["demo", "beta"])
def test_chat_completion_object(client, model):
    out = client.chat.completions.create(model=model, messages=USER, max_tokens=5, temperature=0)
    choice = assert_one_choice(out, ChatCompletion, "chat.completion", model)
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)


def test_ids_are_unique(client):
    ids = {client.completions.create(model="demo", prompt="x", max_tokens=1).id for _ in range(3)}
    ids |= {client.chat.completions.create(model="demo", messages=USER, max_tokens=1).id for _ in range(3)}
    assert len(ids) == 6


def test_non_stream_content_type_and_request_id(live_server):
    body = {"model": "demo", "prompt": "hi", "max_tokens": 2}
    r = httpx.post(f"{live_server.url}/v1/completions", json=body, headers=headers(), timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers.get("x-request-id")
    r = httpx.post(f"{live_server.url}/v1/completions", json=body, timeout=60,
                   headers={**headers(), "X-Request-Id": "conformance-req-42"})
    assert r.headers.get("x-request-id") == "conformance-req-42"


def test_n_choices_and_prompt_list(client):
    """Several prompts x n: choices are prompt-major, indexed 0.., and each equals the prompt sent alone."""
    prompts = ["The sea is", "Mountains are"]
    out = client.completions.create(model="demo", prompt=prompts, n=2, max_tokens=6, temperature=0, extra_body=EXACT)
    assert [c.index for c in sorted(out.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in out.choices}
    for p, prompt in enumerate(prompts):
        alone = client.completions.create(model="demo", prompt=prompt, max_tokens=6, temperature=0, extra_body=EXACT)
        assert by_index[2 * p] == by_index[2 * p + 1] == alone.choices[0].text
    assert out.usage.completion_tokens == 4 * 6


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


def collect_stream(chunks, text_of) -> tuple[dict, dict, list]:
    """(text by index, finish_reason by index, chunks); asserts one finish_reason per choice, given last."""
    texts: dict[int, str] = defaultdict(str)
    finish: dict[int, str] = {}
    seen = []
    for chunk in chunks:
        seen.append(chunk)
        for choice in chunk.choices:
            assert choice.index not in finish, f"choice {choice.index} got a chunk after its finish_reason"
            texts[choice.index] += text_of(choice) or ""
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    return dict(texts), finish, seen


def assert_chunks(chunks, cls, obj: str, model: str) -> None:
    """One id for the whole stream; every chunk typed, named and dated; no usage unless asked."""
    assert len({c.id for c in chunks}) == 1
    for chunk in chunks:
        assert isinstance(chunk, cls)
        assert chunk.object == obj
        assert chunk.model == model
        assert_recent(chunk.created)
        assert chunk.usage is None


def test_completion_stream_n2_matches_non_stream(client):
    kwargs = dict(model="alpha", prompt="In the beginning", n=2, max_tokens=8, temperature=0, extra_body=EXACT)
    full = client.completions.create(**kwargs)
    texts, finish, chunks = collect_stream(client.completions.create(stream=True, **kwargs), lambda c: c.text)
    assert set(texts) == {0, 1} and set(finish) == {0, 1}
    assert finish == {0: "length", 1: "length"}
    expected = {c.index: c.text for c in full.choices}
    assert texts == expected
    assert_chunks(chunks, Completion, "text_completion", "alpha")


def test_completion_stream_seeded_sampling_matches_non_stream(client):
    kwargs = dict(model="demo", prompt="Seeds grow", n=2, max_tokens=10, temperature=1, seed=7, extra_body=EXACT)
    full = client.completions.create(**kwargs)
    texts, finish, _ = collect_stream(client.completions.create(stream=True, **kwargs), lambda c: c.text)
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {0: "length", 1: "length"}


def test_chat_stream_n2_matches_non_stream(client):
    kwargs = dict(model="gamma", messages=USER, n=2, max_tokens=8, temperature=0, extra_body=EXACT)
    full = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(stream=True, **kwargs)
    first_delta: dict[int, object] = {}

    def text_of(choice):
        first_delta.setdefault(choice.index, choice.delta)
        return choice.delta.content

    texts, finish, chunks = collect_stream(stream, text_of)
    assert set(texts) == {0, 1}
    assert finish == {0: "length", 1: "length"}
    assert texts == {c.index: c.message.content for c in full.choices}
    assert {i: d.role for i, d in first_delta.items()} == {0: "assistant", 1: "assistant"}
    assert_chunks(chunks, ChatCompletionChunk, "chat.completion.chunk", "gamma")


def test_stream_long_text_matches_non_stream(client):
    """Longer outputs, where characters span several byte tokens: streamed deltas still add up to the text."""
    for i, model in enumerate(("demo", "alpha", "beta")):
        kwargs = dict(model=model, prompt=f"prompt {i} \u00e9\u4e2d", max_tokens=60, temperature=0, extra_body=EXACT)
        full = client.completions.create(**kwargs).choices[0].text
        texts, _, _ = collect_stream(client.completions.create(stream=True, **kwargs), lambda c: c.text)
        assert texts == {0: full}
        chat = dict(model=model, messages=[{"role": "user", "content": f"q{i} \u00e9"}], max_tokens=60, temperature=0,
                    extra_body=EXACT)
        full = client.chat.completions.create(**chat).choices[0].message.content
        texts, _, _ = collect_stream(client.chat.completions.create(stream=True, **chat), lambda c: c.delta.content)
        assert texts == {0: full}


def test_stream_with_stop_string_matches_non_stream(client):
    """A stop string must not leak into the stream: the streamed text equals the truncated full text."""
    base = client.completions.create(model="demo", prompt="Rivers flow", max_tokens=30, temperature=0,
                                     extra_body=EXACT).choices[0].text
    stop = base[12:15]
    assert stop and stop in base
    kwargs = dict(model="demo", prompt="Rivers flow", max_tokens=30, temperature=0, stop=[stop], extra_body=EXACT)
    full = client.completions.create(**kwargs).choices[0]
    assert full.finish_reason == "stop"
    assert full.text == base[:base.index(stop)]
    texts, finish, _ = collect_stream(client.completions.create(stream=True, **kwargs), lambda c: c.text)
    assert texts == {0: full.text}
    assert finish == {0: "stop"}


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_stream_include_usage(client, kind):
    if kind == "completion":
        create, extra = client.completions.create, {"prompt": "Usage please"}
    else:
        create, extra = client.chat.completions.create, {"messages": USER}
    chunks = list(create(model="demo", max_tokens=5, temperature=0, stream=True, extra_body=EXACT,
                         stream_options={"include_usage": True}, **extra))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 5
    assert last.usage.prompt_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.choices for c in chunks[:-1])

    plain = list(create(model="demo", max_tokens=5, temperature=0, stream=True, extra_body=EXACT, **extra))
    assert all(c.usage is None for c in plain)
    assert all(c.choices for c in plain)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Raw events", "n": 2}),
    ("/v1/chat/completions", {"messages": USER}),
])
def test_raw_sse_framing(live_server, path, body):
    request = {"model": "demo", "max_tokens": 4, "temperature": 0, "stream": True, **body}
    with httpx.stream("POST", live_server.url + path, json=request, headers=headers(), timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert len(events) >= 3
    for event in events:
        for line in event.split("\n"):
            assert line.startswith("data: "), line
    assert events[-1] == "data: [DONE]"
    expected_object = "text_completion" if path == "/v1/completions" else "chat.completion.chunk"
    for event in events[:-1]:
        payload = json.loads(event[len("data: "):])
        assert payload["object"] == expected_object
        assert payload["model"] == "demo"


def test_stream_error_before_streaming(client):
    """An invalid streamed request is an HTTP error, not a 200 stream."""
    with pytest.raises(openai.NotFoundError):
        list(client.chat.completions.create(model="no-such-model", messages=USER, stream=True))
    with pytest.raises(openai.BadRequestError):
        list(client.completions.create(model="demo", prompt="x", temperature="hot", stream=True))


# ---------------------------------------------------------------------------------------------
# Sampling parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_completion_max_tokens_exact(client, max_tokens):
    out = client.completions.create(model="demo", prompt="Count", max_tokens=max_tokens, temperature=0,
                                    extra_body=EXACT)
    assert out.usage.completion_tokens == max_tokens
    assert out.choices[0].finish_reason == "length"


@pytest.mark.parametrize("field", ["max_completion_tokens", "max_tokens"])
def test_chat_max_tokens_exact(client, field):
    out = client.chat.completions.create(model="beta", messages=USER, temperature=0, extra_body=EXACT,
                                         **{field: 6})
    assert out.usage.completion_tokens == 6
    assert out.choices[0].finish_reason == "length"


def test_multiple_stop_strings(client):
    prompt = "Stories begin"
    base = client.completions.create(model="demo", prompt=prompt, max_tokens=40, temperature=0,
                                     extra_body=EXACT).choices[0].text
    early, late = base[8:11], base[24:27]
    assert early and late
    stops = [late, early]  # the list's order must not matter: the first to occur wins
    ends = [base.find(s) + len(s) for s in stops]
    winner = stops[ends.index(min(ends))]
    expected = base[:base.find(winner)]
    out = client.completions.create(model="demo", prompt=prompt, max_tokens=40, temperature=0, stop=stops,
                                    extra_body=EXACT)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == expected
    assert len(expected) < len(base)
    assert out.usage.completion_tokens < 40


def test_chat_stop_string(client):
    base = client.chat.completions.create(model="alpha", messages=USER, max_tokens=30, temperature=0,
                                          extra_body=EXACT).choices[0].message.content
    stop = base[10:13]
    out = client.chat.completions.create(model="alpha", messages=USER, max_tokens=30, temperature=0, stop=stop,
                                         extra_body=EXACT)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == base[:base.find(stop)]


def test_stop_that_never_occurs(client):
    kwargs = dict(model="demo", prompt="Nothing stops", max_tokens=10, temperature=0, extra_body=EXACT)
    base = client.completions.create(**kwargs).choices[0]
    out = client.completions.create(stop=["\u2603never\u2603", "\u00a7\u00a7\u00a7"], **kwargs).choices[0]
    assert out.text == base.text
    assert out.finish_reason == "length"


def test_seed_reproducible_at_temperature_1(client):
    kwargs = dict(model="demo", prompt="Random walk", max_tokens=24, temperature=1, extra_body=EXACT)
    a = client.completions.create(seed=1234, **kwargs).choices[0].text
    b = client.completions.create(seed=1234, **kwargs).choices[0].text
    c = client.completions.create(seed=4321, **kwargs).choices[0].text
    assert a == b
    assert a != c
    chat = dict(model="beta", messages=USER, max_tokens=24, temperature=1, extra_body=EXACT)
    x = client.chat.completions.create(seed=99, **chat).choices[0].message.content
    y = client.chat.completions.create(seed=99, **chat).choices[0].message.content
    z = client.chat.completions.create(seed=100, **chat).choices[0].message.content
    assert x == y
    assert x != z


def test_chat_content_parts_equal_plain_string(client):
    plain = [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": "Describe the moon."}]
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "Describe the moon."}]}]
    a = client.chat.completions.create(model="demo", messages=plain, max_tokens=10, temperature=0, extra_body=EXACT)
    b = client.chat.completions.create(model="demo", messages=parts, max_tokens=10, temperature=0, extra_body=EXACT)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_adapters_change_the_output(client):
    """The request's `model` picks the adapter: the random adapters give outputs unlike the base model's."""
    outs = {m: client.completions.create(model=m, prompt="Which model?", max_tokens=12, temperature=0,
                                         extra_body=EXACT).choices[0].text for m in ("demo", *ADAPTERS)}
    assert len(set(outs.values())) == 4, outs


# ---------------------------------------------------------------------------------------------
# Logprobs
# ---------------------------------------------------------------------------------------------


def test_completion_logprobs(client):
    out = client.completions.create(model="demo", prompt="Probabilities", max_tokens=6, temperature=0, logprobs=3,
                                    extra_body=EXACT)
    choice = out.choices[0]
    lp = choice.logprobs
    assert lp is not None
    n = out.usage.completion_tokens
    assert n == 6
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    if not any("\ufffd" in t for t in lp.tokens):  # a token holding part of a character prints as U+FFFD
        assert "".join(lp.tokens) == choice.text
    if lp.text_offset is not None:
        assert len(lp.text_offset) == n
        assert lp.text_offset == sorted(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert isinstance(token, str)
        assert math.isfinite(logprob) and logprob <= 1e-6
        assert 1 <= len(top) <= 4
        assert all(math.isfinite(v) and v <= 1e-6 for v in top.values())
        # greedy: the chosen token is the most likely one
        assert abs(logprob - max(top.values())) < 1e-5
        assert token in top and abs(top[token] - logprob) < 1e-5


def test_completion_logprobs_with_sampling_are_valid(client):
    out = client.completions.create(model="alpha", prompt="Sampled", max_tokens=8, temperature=1, seed=3,
                                    logprobs=2, extra_body=EXACT)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 1e-6
        assert logprob <= max(top.values()) + 1e-5
        assert 1 <= len(top) <= 3


def test_completion_top_logprobs_hold_the_sampled_token(client):
    out = client.completions.create(model="alpha", prompt="Sampled", max_tokens=8, temperature=1, seed=3,
                                    logprobs=2, extra_body=EXACT)
    lp = out.choices[0].logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert token in top, (token, top)
        assert abs(top[token] - logprob) < 1e-5
        assert len(top) <= 3


def test_completion_logprobs_zero(client):
    out = client.completions.create(model="demo", prompt="Zero", max_tokens=3, temperature=0, logprobs=0,
                                    extra_body=EXACT)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 3
    assert lp.top_logprobs is not None and len(lp.top_logprobs) == 3
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert isinstance(top, dict), lp.top_logprobs
        assert len(top) <= 1
        if top:
            assert abs(top[token] - logprob) < 1e-5


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="demo", messages=USER, max_completion_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=2, extra_body=EXACT)
    choice = out.choices[0]
    assert choice.logprobs is not None
    content = choice.logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == choice.message.content
    for item in content:
        assert math.isfinite(item.logprob) and item.logprob <= 1e-6
        if item.bytes is not None:
            assert all(isinstance(b, int) and 0 <= b <= 255 for b in item.bytes)
        assert len(item.top_logprobs) == 2
        values = [t.logprob for t in item.top_logprobs]
        assert all(v <= 1e-6 for v in values)
        assert values == sorted(values, reverse=True)
        # greedy: the chosen token is the most likely one
        assert abs(item.logprob - values[0]) < 1e-5
        assert item.token == item.top_logprobs[0].token


def test_chat_logprobs_bytes_rebuild_the_text(client):
    """API reference: `bytes` are the token's UTF-8 bytes, to be combined where a character spans tokens.
    Special tokens are kept in the text here, since their bytes are in the logprobs."""
    for i in range(4):
        out = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": f"q{i} \u00e9"}],
                                             max_tokens=60, temperature=0, logprobs=True,
                                             extra_body={**EXACT, "skip_special_tokens": False})
        choice = out.choices[0]
        raw = b"".join(bytes(item.bytes) for item in choice.logprobs.content)
        # invalid sequences of a random model decode to U+FFFD either way; every real character must survive
        rebuilt = raw.decode("utf-8", errors="replace").replace("\ufffd", "")
        assert rebuilt == choice.message.content.replace("\ufffd", ""), i


def test_chat_logprobs_without_top(client):
    out = client.chat.completions.create(model="demo", messages=USER, max_tokens=3, temperature=0, logprobs=True,
                                         extra_body=EXACT)
    content = out.choices[0].logprobs.content
    assert len(content) == 3
    assert all(item.top_logprobs == [] for item in content)


def test_chat_stream_logprobs(client):
    kwargs = dict(model="demo", messages=USER, max_tokens=5, temperature=0, logprobs=True, top_logprobs=1,
                  extra_body=EXACT)
    full = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                streamed.extend(choice.logprobs.content)
    assert [t.token for t in streamed] == [t.token for t in full]
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, full, strict=True))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unknown_model_is_404(client):
    for call in (lambda: client.completions.create(model="no-such-model", prompt="x", max_tokens=1),
                 lambda: client.chat.completions.create(model="no-such-model", messages=USER, max_tokens=1)):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.status_code == 404
        error = assert_error_shape(info.value.response, 404)
        assert "no-such-model" in error["message"]


CHAT_BAD = [
    ("temperature", {"temperature": "hot"}),
    ("temperature", {"temperature": 2.5}),
    ("top_p", {"top_p": 1.5}),
    ("messages", {"messages": []}),
    ("messages", {"messages": [{"role": "wizard", "content": "abracadabra"}]}),
    ("n", {"n": -1}),
    ("n", {"n": 0}),
    ("max_tokens", {"max_tokens": -1}),
    ("max_completion_tokens", {"max_completion_tokens": 0}),
    ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
    ("stop", {"stop": 5}),
    ("seed", {"seed": "abc"}),
]


@pytest.mark.parametrize("param,kwargs", CHAT_BAD, ids=[f"{p}-{i}" for i, (p, _) in enumerate(CHAT_BAD)])
def test_chat_bad_request(client, param, kwargs):
    request = {"model": "demo", "messages": USER, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**request)
    assert info.value.status_code == 400
    error = assert_error_shape(info.value.response, 400)
    assert error["param"] and param in error["param"], error


COMPLETION_BAD = [
    ("temperature", {"temperature": "hot"}),
    ("n", {"n": -1}),
    ("max_tokens", {"max_tokens": -1}),
    ("max_tokens", {"max_tokens": 0}),
    ("logprobs", {"logprobs": 21}),
    ("prompt", {"prompt": 123}),
]


@pytest.mark.parametrize("param,kwargs", COMPLETION_BAD, ids=[f"{p}-{i}" for i, (p, _) in enumerate(COMPLETION_BAD)])
def test_completion_bad_request(client, param, kwargs):
    request = {"model": "demo", "prompt": "hello", "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**request)
    error = assert_error_shape(info.value.response, 400)
    assert error["param"] and param in error["param"], error


# Every list a body may carry is bounded (loraplex/api/protocol.py): just over each bound is a 400 on the field.
OVER_THE_LIMITS = [
    ("stop_token_ids", "/v1/completions", {"stop_token_ids": list(range(1025))}),
    ("stop", "/v1/completions", {"stop": [str(i) for i in range(17)]}),
    ("stop", "/v1/completions", {"stop": "x" * 1025}),
    ("stop", "/v1/chat/completions", {"stop": ["ok", "x" * 1025]}),
    ("logit_bias", "/v1/chat/completions", {"logit_bias": {str(i): 1 for i in range(301)}}),
    ("tools", "/v1/chat/completions", {"tools": [{}] * 129}),
    ("messages", "/v1/chat/completions", {"messages": USER * 2049}),
    ("messages[0].content", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 1025}]}),
    ("prompt", "/v1/completions", {"prompt": ["a"] * 2049}),
    ("prompt", "/v1/completions", {"prompt": [[1]] * 2049}),
]


@pytest.mark.parametrize("param,path,fields", OVER_THE_LIMITS,
                         ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(OVER_THE_LIMITS)])
def test_lists_over_their_limit_are_400(live_server, param, path, fields):
    base = {"model": "demo", "max_tokens": 2, **({"prompt": "x"} if path == "/v1/completions" else {"messages": USER})}
    r = httpx.post(f"{live_server.url}{path}", json={**base, **fields}, headers=headers(), timeout=30)
    error = assert_error_shape(r, 400)
    assert error["param"] == param and error["message"].startswith(f"{param}: "), error


def test_lists_at_their_limit_are_taken(client):
    out = client.completions.create(model="demo", prompt="x", max_tokens=2, stop=["x" * 1024] * 16,
                                    extra_body={"stop_token_ids": list(range(1024))})
    assert out.choices[0].finish_reason in ("stop", "length")


def test_a_body_of_too_many_json_lists_is_400(live_server):
    body = {"model": "demo", "prompt": "x", "max_tokens": 2, "ignored": [[]] * 70_000}
    r = httpx.post(f"{live_server.url}/v1/completions", json=body, headers=headers(), timeout=30)
    assert "JSON lists and objects" in assert_error_shape(r, 400)["message"]
    brackets_in_text = {"model": "demo", "prompt": "[{" * 40_000, "max_tokens": 2}
    r = httpx.post(f"{live_server.url}/v1/completions", json=brackets_in_text, headers=headers(), timeout=30)
    assert "max_model_len" in assert_error_shape(r, 400)["message"], "brackets inside strings are not counted"


def test_chat_text_too_long_to_fit_is_refused_before_the_template(live_server):
    body = {"model": "demo", "max_tokens": 2, "messages": [{"role": "user", "content": "x" * 400_000}]}
    r = httpx.post(f"{live_server.url}/v1/chat/completions", json=body, headers=headers(), timeout=30)
    error = assert_error_shape(r, 400)
    assert error["param"] == "messages" and "max_model_len" in error["message"], error


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None},
                                     {"role": "user", "content": []}], ids=["missing", "null", "empty-list"])
def test_user_message_content_is_required(live_server, message):
    body = {"model": "demo", "messages": [message], "max_tokens": 2}
    r = httpx.post(f"{live_server.url}/v1/chat/completions", json=body, headers=headers(), timeout=30)
    error = assert_error_shape(r, 400)
    assert error["param"] and "messages" in error["param"]


def test_context_length_exceeded_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="demo", prompt=[5] * 600, max_tokens=1)
    assert_error_shape(info.value.response, 400)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="demo", prompt="short", max_tokens=600)
    assert_error_shape(info.value.response, 400)


def test_refused_unsupported_fields(client):
    """docs/api.md: fields that would change the output and are not implemented get 400, not silence."""
    for kwargs in ({"length_penalty": 0.5}, {"bad_words": ["light"]}, {"use_beam_search": True}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="demo", messages=USER, max_tokens=2, extra_body=kwargs)
        error = assert_error_shape(info.value.response, 400)
        assert error["param"] == next(iter(kwargs)), error


def test_raw_malformed_requests_are_400(live_server):
    url = f"{live_server.url}/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={**headers(), "Content-Type": "application/json"}, timeout=30)
    assert_error_shape(r, 400)
    r = httpx.post(url, json={"messages": USER}, headers=headers(), timeout=30)  # no model
    assert assert_error_shape(r, 400)["param"] == "model"
    r = httpx.post(f"{live_server.url}/v1/completions", json={"model": "demo"}, headers=headers(), timeout=30)
    assert assert_error_shape(r, 400)["param"] == "prompt"


def test_wrong_api_key(live_server):
    bad = live_server.client(api_key="not-the-key")
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="demo", messages=USER, max_tokens=1)
    assert info.value.status_code == 401
    assert assert_error_shape(info.value.response, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="demo", prompt="x", max_tokens=1)


def test_admin_key_also_works_for_inference(live_server):
    out = live_server.client(api_key=ADMIN_KEY).completions.create(model="demo", prompt="x", max_tokens=1)
    assert out.object == "text_completion"


def test_no_api_key_raw(live_server):
    for method, path, body in (("POST", "/v1/chat/completions", {"model": "demo", "messages": USER}),
                               ("POST", "/v1/completions", {"model": "demo", "prompt": "x"}),
                               ("GET", "/v1/models", None)):
        r = httpx.request(method, live_server.url + path, json=body, timeout=30)
        assert_error_shape(r, 401)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def test_models_list(client, live_server):
    page = client.models.list()
    models = {m.id: m for m in page.data}
    assert set(models) == {"demo", *ADAPTERS}
    for m in page.data:
        assert isinstance(m, Model)
        assert m.object == "model"
        assert type(m.created) is int
        assert isinstance(m.owned_by, str)
    assert models["demo"].model_extra.get("parent") is None
    for name in ADAPTERS:
        assert models[name].model_extra.get("parent") == "demo"

    raw = httpx.get(f"{live_server.url}/v1/models", headers=headers(), timeout=30)
    assert raw.status_code == 200
    assert raw.json()["object"] == "list"


def test_models_retrieve(client):
    model = client.models.retrieve("alpha")
    assert isinstance(model, Model)
    assert model.id == "alpha" and model.object == "model"
    assert model.model_extra.get("parent") == "demo"
    assert client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# ---------------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------------


def test_concurrent_mixed_models_equal_alone(client):
    models = ["demo", *ADAPTERS]
    jobs = []
    for i in range(12):
        model = models[i % 4]
        if i % 2 == 0:
            jobs.append(("completion", dict(model=model, prompt=f"Job number {i} says", max_tokens=8 + i % 3,
                                            temperature=0, extra_body=EXACT)))
        else:
            jobs.append(("chat", dict(model=model, messages=[{"role": "user", "content": f"Job {i}?"}],
                                      max_tokens=8 + i % 3, temperature=0, extra_body=EXACT)))

    def run(job):
        kind, kwargs = job
        if kind == "completion":
            out = client.completions.create(**kwargs)
            return out.model, out.choices[0].text, out.usage.completion_tokens
        out = client.chat.completions.create(**kwargs)
        return out.model, out.choices[0].message.content, out.usage.completion_tokens

    alone = [run(job) for job in jobs]
    barrier = threading.Barrier(len(jobs))

    def run_together(job):
        barrier.wait(timeout=30)
        return run(job)

    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run_together, jobs))
    assert together == alone
    for (_, kwargs), (model, _, tokens) in zip(jobs, alone, strict=True):
        assert model == kwargs["model"]
        assert tokens == kwargs["max_tokens"]
