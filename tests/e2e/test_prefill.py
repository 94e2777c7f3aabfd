"""Assistant prefill: a chat whose final message is the assistant's, sent with add_generation_prompt false
(or vLLM's continue_final_message true), is continued: the prompt is the chat template's rendering with
that message left open, as transformers' `apply_chat_template(..., continue_final_message=True)` renders
it, and the model writes on from its last character."""

from __future__ import annotations

import asyncio

import openai
import pytest
import transformers

from loraplex.engine.async_engine import AsyncEngine
from loraplex.models.tokenizer import Tokenizer

QUESTION = {"role": "user", "content": "Tell me a story about a lighthouse."}
PREFILL = {"role": "assistant", "content": "Once upon a time, on a rocky"}
CONVERSATIONS = {
    "prefill": [QUESTION, PREFILL],
    "with-system": [{"role": "system", "content": "Be brief."}, QUESTION, PREFILL],
    "trailing-spaces": [QUESTION, {"role": "assistant", "content": "The keeper said:  "}],
    "content-seen-before": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"},
                            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}],
    "empty": [QUESTION, {"role": "assistant", "content": ""}],
}
# Llama 3's way: the content trimmed, so the open message ends at its last non-space character.
TRIMMING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n\\n' + message['content'] | trim + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n\\n' }}{% endif %}"
)
EXACT = {"ignore_eos": True}


@pytest.fixture(scope="module")
def hf_tokenizer(demo_dir):
    return transformers.AutoTokenizer.from_pretrained(str(demo_dir))


def reference_ids(hf_tokenizer, messages: list[dict], **kwargs) -> list[int]:
    """transformers' prompt, tokenized as loraplex tokenizes a rendered chat (the template has the specials)."""
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return hf_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_the_open_rendering_is_transformers_continue_final_message(demo_dir, hf_tokenizer, name):
    messages = CONVERSATIONS[name]
    ours = Tokenizer.from_dir(demo_dir).apply_chat_template(messages, add_generation_prompt=False,
                                                             continue_final_message=True)
    assert ours == hf_tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    closed = Tokenizer.from_dir(demo_dir).apply_chat_template(messages, add_generation_prompt=False)
    assert ours != closed and closed.startswith(ours), "the open message is the closed one, cut after its content"


@pytest.mark.parametrize("name", ["prefill", "trailing-spaces"])
def test_a_template_that_trims_the_content_is_cut_like_transformers(demo_dir, hf_tokenizer, name):
    messages = CONVERSATIONS[name]
    base = Tokenizer.from_dir(demo_dir)
    tokenizer = Tokenizer(base.backend, bos_token=base.bos_token, eos_token=base.eos_token,
                          add_bos_token=base.add_bos_token, chat_template=TRIMMING_TEMPLATE)
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    expected = hf_tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=False,
                                                chat_template=TRIMMING_TEMPLATE)
    assert ours == expected
    assert ours.endswith(messages[-1]["content"].strip())


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_encode_chat_gives_transformers_token_ids(demo_llm, hf_tokenizer, name):
    messages = CONVERSATIONS[name]

    async def encode():
        engine = AsyncEngine(demo_llm.engine)
        return await engine.encode_chat(messages, add_generation_prompt=False, continue_final_message=True)

    assert asyncio.run(encode()) == reference_ids(hf_tokenizer, messages, continue_final_message=True)


# ---------------------------------------------------------------------------------------------
# Over HTTP, through the official client
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return live_server.client()


def continuation(client, hf_tokenizer, model: str, messages: list[dict], max_tokens: int = 12):
    """What the completions endpoint generates from transformers' open prompt (its token ids, sent as is)."""
    ids = reference_ids(hf_tokenizer, messages, continue_final_message=True)
    out = client.completions.create(model=model, prompt=ids, max_tokens=max_tokens, temperature=0, extra_body=EXACT)
    return ids, out.choices[0].text


@pytest.mark.parametrize("model", ["demo", "alpha"])
@pytest.mark.parametrize("name", ["prefill", "with-system", "trailing-spaces"])
@pytest.mark.parametrize("how", [{"add_generation_prompt": False}, {"continue_final_message": True},
                                 {"add_generation_prompt": False, "continue_final_message": True}],
                         ids=["add_generation_prompt-false", "continue_final_message", "both"])
def test_a_final_assistant_message_is_continued(client, hf_tokenizer, model, name, how):
    messages = CONVERSATIONS[name]
    ids, expected = continuation(client, hf_tokenizer, model, messages)
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                         extra_body={**EXACT, **how})
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == "length"


def test_a_streamed_prefill_is_continued_too(client, hf_tokenizer):
    messages = CONVERSATIONS["prefill"]
    _, expected = continuation(client, hf_tokenizer, "demo", messages)
    stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, extra_body={**EXACT, "add_generation_prompt": False})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expected


def test_the_prefill_differs_from_a_new_turn(client, hf_tokenizer):
    """The default (add_generation_prompt true) closes the assistant message and opens a new one."""
    messages = CONVERSATIONS["prefill"]
    new_turn = reference_ids(hf_tokenizer, messages, add_generation_prompt=True)
    out = client.chat.completions.create(model="demo", messages=messages, max_tokens=2, temperature=0,
                                         extra_body=EXACT)
    assert out.usage.prompt_tokens == len(new_turn)
    assert len(new_turn) != len(reference_ids(hf_tokenizer, messages, continue_final_message=True))


def test_add_generation_prompt_false_after_a_user_message_is_not_a_prefill(client, hf_tokenizer):
    """Only an assistant message is continued: after a user message the conversation is rendered closed."""
    messages = [QUESTION]
    out = client.chat.completions.create(model="demo", messages=messages, max_tokens=2, temperature=0,
                                         extra_body={**EXACT, "add_generation_prompt": False})
    assert out.usage.prompt_tokens == len(reference_ids(hf_tokenizer, messages, add_generation_prompt=False))


@pytest.mark.parametrize(("messages", "extra", "says"), [
    ([QUESTION], {"continue_final_message": True}, "only an assistant message can be continued"),
    ([QUESTION, PREFILL], {"continue_final_message": True, "add_generation_prompt": True}, "add_generation_prompt"),
], ids=["after-a-user-message", "with-add_generation_prompt-true"])
def test_continue_final_message_is_refused_where_it_cannot_apply(client, messages, extra, says):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo", messages=messages, max_tokens=2, extra_body=extra)
    error = info.value.body
    assert error["param"] == "continue_final_message", error
    assert says in error["message"], error
