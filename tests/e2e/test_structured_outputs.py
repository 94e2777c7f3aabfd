"""Structured outputs through the official `openai` client against a live server on the demo model:
`response_format` (json_object, json_schema), vLLM's guided_json / guided_regex / guided_choice /
guided_grammar and structured_outputs, on both endpoints, streamed or not, mixed with unconstrained and
adapter requests whose outputs stay those they give alone; a bad schema is a 400 naming its field."""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import openai
import pytest

N = 40  # seeded sampled requests per schema (the engine tests run more, offline)
USER = [{"role": "user", "content": "Describe a lighthouse keeper."}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "[A-Za-z ]{1,12}"},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "skills": {"type": "array", "items": {"enum": ["rope", "lamp", "boat"]}, "maxItems": 3},
    "boss": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"name": {"enum": ["Ann", "Bo"]}},
                                          "required": ["name"], "additionalProperties": False}]}},
    "required": ["name", "age", "skills", "boss"], "additionalProperties": False}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return live_server.client()


def chat(client, seed: int, **kwargs):
    return client.chat.completions.create(model="demo", messages=USER, temperature=1.0, seed=seed,
                                          max_tokens=kwargs.pop("max_tokens", 200), **kwargs)


def run_all(fn, args):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # together: they share the server's batches
        return list(pool.map(fn, args))


def test_json_schema_response_format_validates_every_time(client):
    outs = run_all(lambda seed: chat(client, seed, response_format=JSON_SCHEMA_FORMAT), range(N))
    for out in outs:
        choice = out.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({out.choices[0].message.content for out in outs}) > 1


def test_json_object_response_format_gives_an_object(client):
    for seed in range(8):
        out = chat(client, seed, response_format={"type": "json_object"}, max_tokens=400)
        if out.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(out.choices[0].message.content), dict)
        else:
            assert out.choices[0].finish_reason == "length"
            assert out.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_vllm_guided_fields_on_both_endpoints(client, endpoint):
    def create(seed: int, extra: dict) -> str:
        if endpoint == "chat":
            return chat(client, seed, max_tokens=60, extra_body=extra).choices[0].message.content
        out = client.completions.create(model="demo", prompt="The answer:", temperature=1.0, seed=seed,
                                        max_tokens=60, extra_body=extra)
        return out.choices[0].text

    choices = ["yes", "no", "not sure"]
    assert all(create(seed, {"guided_choice": choices}) in choices for seed in range(10))
    assert all(create(seed, {"structured_outputs": {"choice": choices}}) in choices for seed in range(10, 15))
    regex = r"[A-Z][a-z]{1,6}-\d{2}"
    assert all(re.fullmatch(regex, create(seed, {"guided_regex": regex})) for seed in range(10))
    grammar = 'root ::= "light" ("house" | "ship" | "er")'
    assert all(create(seed, {"guided_grammar": grammar}) in ("lighthouse", "lightship", "lighter")
               for seed in range(5))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    for seed in range(5):
        jsonschema.validate(json.loads(create(seed, {"guided_json": schema})), schema)
        jsonschema.validate(json.loads(create(seed, {"structured_outputs": {"json": schema}})), schema)


def test_streamed_structured_output_joins_into_a_valid_document(client):
    for seed in range(5):
        stream = chat(client, seed, response_format=JSON_SCHEMA_FORMAT, stream=True)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        jsonschema.validate(json.loads(text), PERSON)
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_cut_says_length_and_is_a_prefix(client):
    for seed in range(5):
        whole = chat(client, seed, response_format=JSON_SCHEMA_FORMAT).choices[0]
        part = chat(client, seed, response_format=JSON_SCHEMA_FORMAT, max_tokens=6).choices[0]
        assert part.finish_reason == "length"
        assert whole.message.content.startswith(part.message.content)
        jsonschema.validate(json.loads(whole.message.content), PERSON)


def test_unconstrained_and_adapter_requests_are_unchanged_by_constrained_ones(client):
    """In the same batches as constrained requests, plain and adapter requests give what they give alone."""
    plain = [(model, seed) for model in ("demo", "alpha", "beta") for seed in range(4)]

    def unconstrained(job):
        model, seed = job
        out = client.chat.completions.create(model=model, messages=USER, temperature=1.0, seed=seed, max_tokens=16,
                                             extra_body={"ignore_eos": True})
        return out.choices[0].message.content

    alone = run_all(unconstrained, plain)
    jobs = [("plain", job) for job in plain] + [("schema", seed) for seed in range(24)]

    def mixed_job(job):
        kind, arg = job
        if kind == "plain":
            return unconstrained(arg)
        model = ("demo", "alpha", "beta")[arg % 3]  # the adapter does not matter to the mask
        out = client.chat.completions.create(model=model, messages=USER, temperature=1.0, seed=arg, max_tokens=200,
                                             response_format=JSON_SCHEMA_FORMAT)
        jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
        return None

    mixed = run_all(mixed_job, jobs)
    assert mixed[: len(plain)] == alone


@pytest.mark.parametrize(("extra", "field"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_json": {"type": "string", "pattern": "(("}}, "guided_json"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_grammar": 'root ::= "x'}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
])
def test_a_bad_constraint_is_a_400_naming_its_field(client, extra, field):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, 0, extra_body=extra)
    assert info.value.status_code == 400
    assert info.value.body["param"] == field, info.value.body
