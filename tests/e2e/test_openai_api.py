"""The OpenAI API, driven by the official `openai` client against a live server: outputs equal the
offline engine's on the same model, streaming equals non-streaming, errors come in OpenAI's shape."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import httpx
import openai
import pytest
from server_harness import ADMIN_KEY, API_KEY

from loraplex import LLM, SamplingParams
from loraplex.api.protocol import ChatCompletionRequest, CompletionRequest
from loraplex.models.demo import DEMO_ADAPTERS

PROMPTS = ["The quick brown fox", "Once upon a time", "In a hole in the ground there lived"]


@pytest.fixture(scope="module")
def offline(demo_dir):
    """The offline engine on the same checkpoint and adapters: what the server must return."""
    adapters = {name: str(demo_dir / "adapters" / name) for name in DEMO_ADAPTERS}
    return LLM(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=512, kv_cache_memory="64MiB",
               adapters=adapters)


def greedy(offline, prompt, adapter=None, **kwargs):
    params = SamplingParams(temperature=0, **kwargs)
    return offline.generate(prompt, params, adapter=adapter)[0]


def test_models_lists_base_and_adapters_with_parent(live_server):
    models = {m.id: m for m in live_server.client().models.list().data}
    assert set(models) == {"demo", *DEMO_ADAPTERS}
    assert models["demo"].parent is None
    assert all(models[name].parent == "demo" for name in DEMO_ADAPTERS)
    assert live_server.client().models.retrieve("beta").parent == "demo"
    with pytest.raises(openai.NotFoundError):
        live_server.client().models.retrieve("nope")


def test_completion_matches_the_offline_engine(live_server, offline):
    client = live_server.client()
    resp = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    expected = greedy(offline, PROMPTS[0], max_tokens=12)
    assert resp.choices[0].text == expected.text
    assert resp.choices[0].finish_reason == expected.finish_reason
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == len(expected.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.object == "text_completion" and resp.model == "demo"


def test_adapters_run_concurrently_each_with_its_own_weights(live_server, offline):
    client = live_server.client()
    jobs = [(model, prompt) for model in ("demo", *DEMO_ADAPTERS) for prompt in PROMPTS]

    def run(job):
        model, prompt = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(run, jobs))
    expected = [greedy(offline, p, adapter=None if m == "demo" else m, max_tokens=10).text for m, p in jobs]
    assert texts == expected
    by_model = {m: [t for (mm, _), t in zip(jobs, texts, strict=True) if mm == m] for m in ("demo", *DEMO_ADAPTERS)}
    assert len({tuple(v) for v in by_model.values()}) == len(by_model), "an adapter changed nothing"


def test_prompt_forms_lists_and_token_ids(live_server, offline):
    client = live_server.client()
    ids = offline.tokenizer.encode(PROMPTS[1])
    many = client.completions.create(model="alpha", prompt=PROMPTS, max_tokens=6, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == [greedy(offline, p, "alpha", max_tokens=6).text for p in PROMPTS]
    one = client.completions.create(model="demo", prompt=ids, max_tokens=6, temperature=0)
    assert one.choices[0].text == greedy(offline, ids, max_tokens=6).text
    both = client.completions.create(model="demo", prompt=[ids, ids[:3]], max_tokens=6, temperature=0)
    assert [c.text for c in both.choices] == [greedy(offline, p, max_tokens=6).text for p in (ids, ids[:3])]
    assert both.usage.prompt_tokens == len(ids) + 3


def test_n_choices_with_a_seed_are_reproducible(live_server, offline):
    client = live_server.client()
    kwargs = dict(model="beta", prompt=PROMPTS[2], max_tokens=8, temperature=1.0, n=3, seed=7)
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1, "n choices should be different samples"
    assert first.usage.prompt_tokens == len(offline.tokenizer.encode(PROMPTS[2])), "the prompt counts once"
    assert 3 <= first.usage.completion_tokens <= 24


def test_stop_string_ends_the_completion_without_it(live_server, offline):
    client = live_server.client()
    full = greedy(offline, PROMPTS[0], max_tokens=20).text
    stop = full[5:7]
    resp = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == full[: full.index(stop)]


def test_streamed_completion_equals_the_whole(live_server):
    client = live_server.client()
    whole = client.completions.create(model="gamma", prompt=PROMPTS[1], max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="gamma", prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_uses_the_template_and_streams_the_same_text(live_server, offline):
    client = live_server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    resp = client.chat.completions.create(model="beta", messages=messages, max_tokens=12, temperature=0)
    rendered = offline.tokenizer.apply_chat_template(messages)
    ids = offline.tokenizer.encode(rendered, add_special_tokens=False)
    expected = greedy(offline, ids, "beta", max_tokens=12)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == expected.text
    assert resp.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="beta", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.total_tokens == resp.usage.total_tokens


def test_chat_n_and_default_max_tokens(live_server):
    client = live_server.client()
    resp = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], n=2,
                                          temperature=0.8, seed=3, max_completion_tokens=5)
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in resp.choices)
    assert resp.usage.completion_tokens <= 10


def test_logprobs_match_the_engine(live_server, offline):
    client = live_server.client()
    resp = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2)
    expected = greedy(offline, PROMPTS[0], "alpha", max_tokens=5, logprobs=2)
    lp = resp.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-4)
    assert "".join(lp.tokens) == resp.choices[0].text
    assert all(len(top) == 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.top_logprobs[0].logprob >= entry.logprob - 1e-6 for entry in content)


def test_unknown_model_is_a_404(live_server):
    with pytest.raises(openai.NotFoundError) as info:
        live_server.client().completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


@pytest.mark.parametrize(("field", "value"), [("temperature", 5), ("max_tokens", 0), ("n", 0), ("top_p", 0),
                                              ("logprobs", 50), ("stop", 3), ("presence_penalty", 2.5)])
def test_bad_parameters_are_a_400_naming_the_field(live_server, field, value):
    with pytest.raises(openai.BadRequestError) as info:
        live_server.client().completions.create(model="demo", prompt="x", **{field: value})
    error = info.value.body
    assert error["param"].split(".")[0] == field and error["type"] == "invalid_request_error"
    assert field in error["message"]


def test_too_long_a_request_is_a_400(live_server):
    with pytest.raises(openai.BadRequestError) as info:
        live_server.client().completions.create(model="demo", prompt="x", max_tokens=100_000)
    assert "max_model_len" in info.value.body["message"] and info.value.body["param"] == "max_tokens"


def test_unknown_fields_are_ignored(live_server):
    resp = httpx.post(f"{live_server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "demo", "prompt": "x", "max_tokens": 2, "made_up_field": {"a": 1}})
    assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_malformed_json_is_a_400_in_openai_shape(live_server):
    resp = httpx.post(f"{live_server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}",
                      "Content-Type": "application/json"}, content=b"{not json")
    assert resp.status_code == 400
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("path", "model", "body"), [
    ("/v1/completions", CompletionRequest, {"prompt": "x"}),
    ("/v1/chat/completions", ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]})])
def test_bodies_are_parsed_and_validated_off_the_event_loop(live_server, monkeypatch, path, model, body):
    """A large body must not hold the event loop (and /health) while it is parsed and validated."""
    threads = []
    validate = model.model_validate

    def recording(obj, *args, **kwargs):
        threads.append(threading.current_thread())
        return validate(obj, *args, **kwargs)

    monkeypatch.setattr(model, "model_validate", recording)
    resp = httpx.post(f"{live_server.url}{path}", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "demo", "max_tokens": 1, **body})
    assert resp.status_code == 200, resp.text
    # One validation (after json.loads, in the same call), not on the thread of uvicorn's event loop.
    assert len(threads) == 1 and threads[0].name != "test-server", threads


def test_auth(live_server):
    with pytest.raises(openai.AuthenticationError):
        live_server.client(api_key="wrong-key-000").models.list()
    resp = httpx.get(f"{live_server.url}/v1/models")
    assert resp.status_code == 401 and "Authorization" in resp.json()["error"]["message"]
    assert live_server.client(api_key=ADMIN_KEY).models.list().data, "the admin key may run inference too"
    assert httpx.get(f"{live_server.url}/health").status_code == 200, "health needs no key"


def test_request_id_is_echoed(live_server):
    resp = httpx.post(f"{live_server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}",
                      "X-Request-Id": "trace-42"}, json={"model": "demo", "prompt": "x", "max_tokens": 1})
    assert resp.headers["x-request-id"] == "trace-42"


def test_body_size_limit_is_a_413(live_server):
    big = json.dumps({"model": "demo", "prompt": "x" * (2 << 20)})
    resp = httpx.post(f"{live_server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}",
                      "Content-Type": "application/json"}, content=big)
    assert resp.status_code == 413 and "--max-body-size" in resp.json()["error"]["message"]
