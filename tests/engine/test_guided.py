"""Structured outputs in the engine (loraplex.engine.guided, on xgrammar): seeded sampled outputs of the
demo model always follow their schema, regex, choice or grammar, also mixed in one batch with
unconstrained requests, whose tokens stay exactly those they give alone; grammars are compiled once and
cached (bounded); a bad schema is an error naming its field; max_tokens cuts a valid prefix."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from loraplex.engine.guided import Grammars, Guide
from loraplex.engine.sampling import SamplingParams
from loraplex.errors import LoraplexError

N = 200  # seeded sampled requests per schema, as the issue asks (each takes a few ms)
PROMPTS = ["Tell me about lighthouses.", "The quick brown fox", "Once upon a time"]

# Strings are bounded by a pattern, not maxLength: xgrammar 0.2.9 lets raw control characters into a
# string with minLength / maxLength (its rule for those excludes only quote, backslash and newlines).
NAME = {"type": "string", "pattern": "[A-Za-z ]{1,12}"}
SCHEMAS = {
    "object": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                                "ok": {"type": "boolean"}},
               "required": ["name", "age", "ok"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1,
              "maxItems": 6},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "size": {"enum": [1, 2, 3]}},
             "required": ["color", "size"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {"name": NAME, "tags": {"type": "array", "items": {
            "enum": ["a", "b"]}, "maxItems": 3}}, "required": ["name", "tags"], "additionalProperties": False},
        "score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["person", "score"], "additionalProperties": False},
    "anyOf": {"type": "object", "properties": {"value": {"anyOf": [
        {"type": "integer", "minimum": 0, "maximum": 99}, {"type": "boolean"}, {"type": "null"},
        {"type": "string", "pattern": "[a-z]{1,6}"}]}}, "required": ["value"], "additionalProperties": False},
}


def sampled(guide: Guide | None, n: int, max_tokens: int = 160, **kwargs) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1000 + i, guide=guide, **kwargs)
            for i in range(n)]


def generate(llm, params: list[SamplingParams]):
    return llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(params))], params)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_outputs_follow_the_schema(demo_llm, name):
    schema = SCHEMAS[name]
    outputs = generate(demo_llm, sampled(Guide.of_schema(schema, "guided_json"), N))
    for out in outputs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    assert len({out.text for out in outputs}) > 1  # sampled, not one answer


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_home):
    from loraplex import LLM

    return LLM(data_dir=str(smollm2_home), dtype="float32", device="cpu", max_model_len=512, kv_cache_memory="256MiB")


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_outputs_of_smollm2_follow_the_schema(smollm2_llm, name):
    """The same on a real model (SmolLM2-135M-Instruct, 49,152 tokens), its json demo adapter on half of them."""
    schema = SCHEMAS[name]
    params = sampled(Guide.of_schema(schema, "guided_json"), N)
    adapters = ["json" if i % 2 else None for i in range(N)]
    outputs = smollm2_llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(N)], params, adapter=adapters)
    for out in outputs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_unconstrained_output_of_the_demo_model_is_not_json(demo_llm):
    """What the masks change: the same seeds without a schema give no valid document."""
    outputs = generate(demo_llm, sampled(None, 20, max_tokens=40))
    valid = 0
    for out in outputs:
        try:
            jsonschema.validate(json.loads(out.text), SCHEMAS["object"])
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    assert valid == 0


def test_regex_choice_grammar_and_json_object(demo_llm):
    regex = r"[a-z]{2,5}-\d{3}"
    for out in generate(demo_llm, sampled(Guide("regex", regex, "guided_regex"), 40)):
        assert re.fullmatch(regex, out.text) and out.finish_reason == "stop"
    choices = ["yes", "no", "maybe so", "a.b (c)"]
    for out in generate(demo_llm, sampled(Guide.of_choice(choices, "guided_choice"), 40)):
        assert out.text in choices
    grammar = 'root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] [0-9]?'
    for out in generate(demo_llm, sampled(Guide("grammar", grammar, "guided_grammar"), 40, max_tokens=60)):
        if out.finish_reason == "stop":
            assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", out.text), out.text
    for out in generate(demo_llm, sampled(Guide("json_object", "", "response_format"), 40, max_tokens=300)):
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)


def test_mixed_batch_leaves_unconstrained_requests_untouched(demo_llm):
    """Constrained and unconstrained sequences in one batch: the unconstrained ones give exactly the tokens
    they give alone (sampled with seeds, and greedy)."""
    plain = sampled(None, 12, max_tokens=24) + [SamplingParams(max_tokens=24, temperature=0)]
    alone = generate(demo_llm, plain)
    guide = Guide.of_schema(SCHEMAS["nested"], "guided_json")
    constrained = sampled(guide, 24)
    mixed = demo_llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(plain))] + ["Q"] * len(constrained),
                              plain + constrained)
    assert [list(o.token_ids) for o in mixed[: len(plain)]] == [list(o.token_ids) for o in alone]
    for out in mixed[len(plain):]:
        jsonschema.validate(json.loads(out.text), SCHEMAS["nested"])


def test_max_tokens_cuts_a_valid_prefix_with_length(demo_llm):
    guide = Guide.of_schema(SCHEMAS["nested"], "guided_json")
    full = generate(demo_llm, sampled(guide, 10))
    cut = generate(demo_llm, sampled(guide, 10, max_tokens=5))
    for whole, part in zip(full, cut, strict=True):
        assert part.finish_reason == "length" and len(part.token_ids) == 5
        assert whole.text.startswith(part.text)  # the prefix of a document that validates
        jsonschema.validate(json.loads(whole.text), SCHEMAS["nested"])


def test_stop_string_ends_a_constrained_output_with_stop(demo_llm):
    guide = Guide.of_schema(SCHEMAS["object"], "guided_json")
    for out in generate(demo_llm, sampled(guide, 5, stop=['"age"'])):
        assert out.finish_reason == "stop" and out.stop_reason == '"age"'


def test_grammars_are_compiled_once_and_cached_bounded(demo_llm):
    engine = demo_llm.engine
    grammars = Grammars(engine.tokenizer, engine.model.config.vocab_size, max_cached=2)
    a, b, c = (Guide("regex", r, "guided_regex") for r in ("a+", "b+", "c+"))
    first = grammars.compile(a)
    assert grammars.compile(a) is first and grammars.compilations == 1
    grammars.compile(b)
    grammars.compile(c)  # a is the least recently used: dropped
    assert grammars.compilations == 3 and len(grammars._cache) == 2
    assert grammars.compile(a) is not first and grammars.compilations == 4


@pytest.mark.parametrize(("guide", "field"), [
    (Guide("json", '{"type": "objec"}', "guided_json"), "guided_json"),
    (Guide("regex", "[a-", "guided_regex"), "guided_regex"),
    (Guide("grammar", 'root ::= "x', "guided_grammar"), "guided_grammar"),
    (Guide("json", '{"type": "string", "pattern": "(("}', "response_format"), "response_format"),
])
def test_a_bad_guide_is_an_error_naming_its_field(demo_llm, guide, field):
    with pytest.raises(LoraplexError) as e:
        demo_llm.engine.grammars.compile(guide)
    assert e.value.field == field and "not a valid" in str(e.value)
    with pytest.raises(LoraplexError):
        demo_llm.generate("x", SamplingParams(guide=guide))
    assert not demo_llm.engine.has_unfinished_requests()


def test_guide_constructors_check_their_input():
    with pytest.raises(LoraplexError):
        Guide.of_choice([], "guided_choice")
    with pytest.raises(LoraplexError):
        Guide.of_schema("{not json", "guided_json")
    assert Guide.of_schema('{"type": "object"}', "guided_json") == Guide.of_schema({"type": "object"}, "guided_json")
