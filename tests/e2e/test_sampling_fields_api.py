"""presence/frequency/repetition penalties, logit_bias, min_tokens and completions' echo through the
official `openai` client against a live server; and vLLM's /tokenize, /detokenize and /version."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_harness import API_KEY

import loraplex
from loraplex import LLM, SamplingParams
from loraplex.models.demo import DEMO_ADAPTERS

PROMPT = "Once upon a time"
EOS = 1


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return live_server.client()


@pytest.fixture(scope="module")
def offline(demo_dir):
    return LLM(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=512, kv_cache_memory="64MiB")


def test_penalties_match_the_offline_engine(client, offline):
    fields = dict(presence_penalty=1.5, frequency_penalty=0.8)
    extra = dict(repetition_penalty=1.6, ignore_eos=True)
    resp = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0, **fields,
                                     extra_body=extra)
    expected = offline.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0, **fields, **extra))[0]
    plain = offline.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert resp.choices[0].text == expected.text and expected.text != plain.text
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                          temperature=0, presence_penalty=-1.0, extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 8


def test_logit_bias_forces_a_token_and_is_checked(client, offline):
    text = offline.engine.tokenizer.decode([42] * 5)
    for create in (lambda **kw: client.completions.create(prompt=PROMPT, **kw).choices[0].text,
                   lambda **kw: client.chat.completions.create(
                       messages=[{"role": "user", "content": "Hi"}], **kw).choices[0].message.content):
        assert create(model="demo", max_tokens=5, temperature=0.7, seed=1, logit_bias={"42": 100},
                      extra_body={"ignore_eos": True}) == text
    vocab = offline.engine.model.config.vocab_size
    for bias, why in [({str(vocab): 5}, "outside the vocabulary"), ({"x": 5}, "token ids"),
                      ({"5": 101}, ""), ({str(i): 1 for i in range(301)}, "at most 300")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="demo", prompt=PROMPT, max_tokens=2, logit_bias=bias)
        assert info.value.body["param"].startswith("logit_bias"), info.value.body
        assert why in info.value.body["message"]


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -2.01),
                                          ("repetition_penalty", 0), ("min_tokens", -1), ("min_tokens", 9),
                                          ("presence_penalty", "1"), ("echo", 1)])
def test_out_of_range_values_are_a_400_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, extra_body={field: value})
    assert info.value.body["param"] == field, info.value.body


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_min_tokens_holds_eos_back(client, endpoint):
    def usage(**extra):
        kw = dict(model="demo", max_tokens=10, temperature=0, logit_bias={str(EOS): 100}, extra_body=extra)
        if endpoint == "completions":
            out = client.completions.create(prompt=PROMPT, **kw)
        else:
            out = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **kw)
        assert out.choices[0].finish_reason == "stop"
        return out.usage.completion_tokens

    assert usage() == 1
    assert usage(min_tokens=4) == 5


def test_echo_prepends_the_prompt(client, offline):
    plain = client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0)
    echoed = client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert echoed.usage == plain.usage
    ids = offline.engine.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=6, temperature=0, echo=True)
    assert by_ids.choices[0].text == offline.engine.tokenizer.decode(ids, False) + plain.choices[0].text
    streamed = client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                         stream=True)
    chunks = [chunk.choices[0].text for chunk in streamed if chunk.choices]
    assert chunks[0].startswith(PROMPT) and "".join(chunks) == echoed.choices[0].text


def test_echo_with_logprobs_gives_the_prompts_logprobs(client, offline):
    ids = offline.engine.tokenizer.encode(PROMPT)
    resp = client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=2)
    lp = resp.choices[0].logprobs
    ref = offline.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0, logprobs=2, prompt_logprobs=2))[0]
    assert len(lp.tokens) == len(ids) + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for got, entry in zip(lp.token_logprobs[1:len(ids)], ref.prompt_logprobs[1:], strict=True):
        assert got == pytest.approx(entry.logprob, abs=1e-5)
    for got, entry in zip(lp.token_logprobs[len(ids):], ref.logprobs, strict=True):
        assert got == pytest.approx(entry.logprob, abs=1e-5)
    assert all(len(top) <= 3 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    streamed = client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                         logprobs=2, stream=True)
    tokens = [t for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for t in chunk.choices[0].logprobs.token_logprobs]
    assert tokens[0] is None and tokens[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)


# -- /tokenize, /detokenize, /version ------------------------------------------------------------


def post(live_server, path: str, body: dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{live_server.url}{path}", json=body, headers=headers, timeout=30)


def test_tokenize_a_prompt_and_messages(live_server, offline):
    tokenizer = offline.engine.tokenizer
    for model in ("demo", list(DEMO_ADAPTERS)[0], None):
        body = {"prompt": PROMPT} if model is None else {"model": model, "prompt": PROMPT}
        resp = post(live_server, "/tokenize", body)
        assert resp.status_code == 200, resp.text
        ids = tokenizer.encode(PROMPT)
        assert resp.json() == {"count": len(ids), "max_model_len": offline.engine.max_model_len, "tokens": ids}
    bare = post(live_server, "/tokenize", {"model": "demo", "prompt": PROMPT, "add_special_tokens": False,
                                           "return_token_strs": True}).json()
    assert bare["tokens"] == tokenizer.encode(PROMPT, add_special_tokens=False)
    assert "".join(bare["token_strs"]) == PROMPT
    messages = [{"role": "user", "content": "Hi there"}]
    chat = post(live_server, "/tokenize", {"model": "demo", "messages": messages}).json()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    completion = live_server.client().chat.completions.create(model="demo", messages=messages, max_tokens=1)
    assert chat["count"] == completion.usage.prompt_tokens


def test_detokenize(live_server, offline):
    ids = offline.engine.tokenizer.encode(PROMPT)
    resp = post(live_server, "/detokenize", {"model": list(DEMO_ADAPTERS)[1], "tokens": ids})
    assert resp.status_code == 200 and resp.json() == {"prompt": offline.engine.tokenizer.decode(ids, False)}
    vocab = offline.engine.model.config.vocab_size
    bad = post(live_server, "/detokenize", {"model": "demo", "tokens": [5, vocab]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    negative = post(live_server, "/detokenize", {"model": "demo", "tokens": [-1]})
    assert negative.status_code == 400


@pytest.mark.parametrize("path, body", [("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [5]})])
def test_tokenizer_routes_404_on_an_unknown_model_and_need_the_key(live_server, path, body):
    missing = post(live_server, path, {**body, "model": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert post(live_server, path, body, key=None).status_code == 401
    assert post(live_server, path, body, key="wrong").status_code == 401


def test_tokenize_needs_a_prompt_or_messages(live_server):
    for body in ({"model": "demo"}, {"model": "demo", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}):
        resp = post(live_server, "/tokenize", body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"


def test_version(live_server):
    resp = httpx.get(f"{live_server.url}/version", timeout=10)
    assert resp.status_code == 200 and resp.json() == {"version": loraplex.__version__}


def test_echo_text_offsets_index_the_returned_text(client):
    resp = client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=0)
    lp, text = resp.choices[0].logprobs, resp.choices[0].text
    first_output = len(lp.tokens) - 4
    assert lp.text_offset[first_output] == len(PROMPT)
    assert text[lp.text_offset[first_output]:].startswith(lp.tokens[first_output][:1])
