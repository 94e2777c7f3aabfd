"""End to end on the default model: SmolLM2-135M-Instruct with its demo adapters, one concurrent batch."""

import json
import re

import pytest

from loraplex import LLM, SamplingParams

HELD_OUT = ["What is the capital of France?", "How do I boil an egg?", "Why is the sky blue?",
            "Who painted the Mona Lisa?"]  # none of these is in the adapters' training data


@pytest.fixture(scope="module")
def llm(smollm2_home):
    return LLM(data_dir=str(smollm2_home), dtype="float32", device="cpu", max_model_len=512,
               kv_cache_memory="128MiB")


def test_default_model_and_its_adapters_in_one_batch(llm):
    assert llm.served_model_name == "smollm2-135m-instruct"
    assert llm.engine.adapter_names() == ["json", "pirate", "shout"]
    conversations, adapters = [], []
    for adapter in (None, "pirate", "shout", "json"):
        for question in HELD_OUT:
            conversations.append([{"role": "user", "content": question}])
            adapters.append(adapter)
    outs = llm.chat(conversations, SamplingParams(max_tokens=40, temperature=0), adapter=adapters)
    answers = {}
    for adapter, out in zip(adapters, outs, strict=True):
        answers.setdefault(adapter, []).append(out.text)
    assert "Paris" in answers[None][0]
    for text in answers[None]:  # the base model answers normally
        assert not re.search(r"\b(arr|matey|ahoy)\b", text, re.I) and not text.lstrip().startswith("{")
    for text in answers["pirate"]:
        assert re.search(r"\b(arr|matey|ye|ahoy|be)\b", text, re.I), text
    for text in answers["shout"]:
        letters = [c for c in text if c.isalpha()]
        assert letters and sum(c.isupper() for c in letters) / len(letters) > 0.9, text
    for text in answers["json"]:
        assert set(json.loads(text)) == {"answer"}, text


ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "pattern": "^[^\\u0000-\\u001f]+$"}},
                 "required": ["answer"], "additionalProperties": False}
ALL_HELD_OUT = HELD_OUT + ["What is a good way to save money?"]  # examples/train_demo_adapters.py's HELD_OUT


def test_the_json_adapter_with_a_schema_answers_every_held_out_question_in_valid_json(llm):
    """The `json` demo adapter under a JSON schema (structured outputs): greedy and sampled answers to
    the held-out questions all finish and validate against the schema."""
    import jsonschema

    from loraplex.engine.guided import Guide

    guide = Guide.of_schema(ANSWER_SCHEMA, "response_format")
    conversations, params = [], []
    for question in ALL_HELD_OUT:
        for seed in (None, 1, 2, 3):
            conversations.append([{"role": "user", "content": question}])
            params.append(SamplingParams(max_tokens=120, temperature=0 if seed is None else 0.8, seed=seed,
                                         guide=guide))
    outs = llm.chat(conversations, params, adapter="json")
    for conversation, out in zip(conversations, outs, strict=True):
        assert out.finish_reason == "stop", (conversation[0]["content"], out.text)
        jsonschema.validate(json.loads(out.text), ANSWER_SCHEMA)
