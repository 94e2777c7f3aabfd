"""The chat templates of the Gemma 2, Gemma 3, Phi-3, Phi-4-mini (and Phi-4) families render in loraplex
exactly as transformers' `apply_chat_template` renders them: the same text and the same token ids, with and
without the generation prompt, with a system message, over several turns, and as a prefill. Gemma's own
system-prompt rules hold: Gemma 2's template refuses a system message (its raise_exception), Gemma 3's folds
it into the first user turn. A template's raise_exception is an error that carries the template's text, and
on the OpenAI chat endpoint a 400 on `messages` with that text, after which the server goes on answering.

No hub access: each family's model directory is the demo tokenizer with the family's special tokens added
and the family's tokenizer_config.json (bos/eos tokens, chat template). transformers reads it with
AutoTokenizer (a PreTrainedTokenizerFast), loraplex with `Tokenizer.from_dir`.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import transformers
from jinja2.exceptions import TemplateError
from server_harness import run_server
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from loraplex.config import ServerConfig
from loraplex.errors import ErrorKind, LoraplexError
from loraplex.models.tokenizer import Tokenizer

# The templates below are reproductions, written from memory, of the `chat_template` published in each
# model's tokenizer_config.json on the Hugging Face hub (not downloaded: the tests run offline). They keep the
# published templates' whitespace control, raise_exception calls and special tokens.

# google/gemma-2-2b-it (also gemma-2-9b-it, gemma-2-27b-it)
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# google/gemma-3-1b-it (also gemma-3-4b-it, -12b-it, -27b-it)
GEMMA3_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# microsoft/Phi-3-mini-4k-instruct (the revision with system messages; also Phi-3.5-mini-instruct)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# microsoft/Phi-4-mini-instruct
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# microsoft/phi-4 (the 14B model; ChatML-like, with <|im_sep|>)
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# family -> (template, bos, eos, special tokens the family's tokenizer.json holds)
FAMILIES = {
    "gemma2": (GEMMA2_TEMPLATE, "<bos>", "<eos>", ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")),
    "gemma3": (GEMMA3_TEMPLATE, "<bos>", "<eos>",
               ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>")),
    "phi3": (PHI3_TEMPLATE, "<s>", "<|endoftext|>",
             ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "phi4-mini": (PHI4_MINI_TEMPLATE, "<|endoftext|>", "<|endoftext|>",
                  ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>")),
    "phi4": (PHI4_TEMPLATE, "<|endoftext|>", "<|im_end|>", ("<|endoftext|>", "<|im_sep|>")),
}

SYSTEM = {"role": "system", "content": "You are a terse assistant.\nAnswer in one line."}
USER = {"role": "user", "content": "What is two plus two?"}
# edge whitespace: Gemma's templates trim the content, the Phi templates keep it
USER_SPACED = {"role": "user", "content": "  And three plus three? \n"}
ASSISTANT = {"role": "assistant", "content": " Four. "}

CONVERSATIONS = {
    "user": [USER],
    "system+user": [SYSTEM, USER],
    "multi-turn": [USER, ASSISTANT, USER_SPACED],
    "system+multi-turn": [SYSTEM, USER, ASSISTANT, USER_SPACED],
}
GEMMA2_REFUSES = {"system+user", "system+multi-turn"}  # Gemma 2: "System role not supported"


def _family_dir(root: Path, demo_dir: Path, family: str) -> Path:
    """The demo tokenizer with the family's special tokens added, and the family's tokenizer_config.json."""
    template, bos, eos, specials = FAMILIES[family]
    out = root / family
    out.mkdir()
    backend = HFTokenizer.from_file(str(demo_dir / "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "chat_template": template}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def family_dirs(demo_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: _family_dir(root, demo_dir, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def tokenizers(family_dirs) -> dict[str, tuple[Tokenizer, transformers.PreTrainedTokenizerBase]]:
    out = {}
    for family, path in family_dirs.items():
        reference = transformers.AutoTokenizer.from_pretrained(str(path))
        assert reference.chat_template == FAMILIES[family][0]
        out[family] = (Tokenizer.from_dir(path), reference)
    return out


def _reference(reference, messages, **kwargs) -> tuple[str, list[int]]:
    text = reference.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = reference.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    return text, list(ids)


def _loraplex(tokenizer: Tokenizer, messages, **kwargs) -> tuple[str, list[int]]:
    text = tokenizer.apply_chat_template(messages, **kwargs)
    return text, tokenizer.encode_many([text], add_special_tokens=False)[0]  # as the server encodes it


# Gemma 2 refuses a system message (test_gemma_refuses_as_transformers_does), so those cases are left out.
CASES = [(family, conversation) for family in FAMILIES for conversation in CONVERSATIONS
         if not (family == "gemma2" and conversation in GEMMA2_REFUSES)]


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen-prompt", "no-gen-prompt"])
@pytest.mark.parametrize("family, conversation", CASES)
def test_rendering_and_token_ids_match_transformers(tokenizers, family, conversation, add_generation_prompt):
    tokenizer, reference = tokenizers[family]
    messages = CONVERSATIONS[conversation]
    expected_text, expected_ids = _reference(reference, messages, add_generation_prompt=add_generation_prompt)
    text, ids = _loraplex(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    assert text == expected_text
    assert ids == expected_ids


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_prefill_matches_transformers_continue_final_message(tokenizers, family):
    tokenizer, reference = tokenizers[family]
    messages = [USER, {"role": "assistant", "content": "The answer is "}]
    expected = _reference(reference, messages, continue_final_message=True)
    assert _loraplex(tokenizer, messages, add_generation_prompt=False, continue_final_message=True) == expected


def test_the_family_special_tokens_are_single_tokens(tokenizers):
    """The comparison means something: the templates' markers are encoded as the added special tokens (one
    id each), as in the real tokenizers, not spelled out as text."""
    for family, (tokenizer, _) in tokenizers.items():
        for token in FAMILIES[family][3]:
            token_id = tokenizer.backend.token_to_id(token)
            assert token_id is not None and token_id >= 2048, (family, token)
    tokenizer, _ = tokenizers["gemma3"]
    _, ids = _loraplex(tokenizer, [USER], add_generation_prompt=True)
    start, end, bos = (tokenizer.backend.token_to_id(t) for t in ("<start_of_turn>", "<end_of_turn>", "<bos>"))
    assert ids[0] == bos and ids.count(bos) == 1 and ids.count(start) == 2 and ids.count(end) == 1


def test_gemma3_folds_the_system_message_into_the_first_user_turn(tokenizers):
    tokenizer, reference = tokenizers["gemma3"]
    messages = [SYSTEM, USER, ASSISTANT, USER_SPACED]
    text, ids = _loraplex(tokenizer, messages, add_generation_prompt=True)
    assert text == (
        "<bos><start_of_turn>user\nYou are a terse assistant.\nAnswer in one line.\n\nWhat is two plus two?"
        "<end_of_turn>\n<start_of_turn>model\nFour.<end_of_turn>\n<start_of_turn>user\nAnd three plus three?"
        "<end_of_turn>\n<start_of_turn>model\n"
    )
    assert "system" not in text
    assert (text, ids) == _reference(reference, messages, add_generation_prompt=True)


def test_gemma3_renders_list_content_as_transformers_does(tokenizers):
    tokenizer, reference = tokenizers["gemma3"]
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": " Hi "}, {"type": "text", "text": "there"}]}]
    assert _loraplex(tokenizer, messages, add_generation_prompt=True) == _reference(
        reference, messages, add_generation_prompt=True)


def test_phi4_mini_renders_a_system_message_with_tools_as_transformers_does(tokenizers):
    tokenizer, reference = tokenizers["phi4-mini"]
    tools = json.dumps([{"name": "add", "description": "Adds", "parameters": {"a": {"type": "int"}}}])
    messages = [{**SYSTEM, "tools": tools}, USER]
    expected = _reference(reference, messages, add_generation_prompt=True)
    assert _loraplex(tokenizer, messages, add_generation_prompt=True) == expected
    assert "<|tool|>" in expected[0]


ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."


@pytest.mark.parametrize("family, messages, error", [
    ("gemma2", [SYSTEM, USER], "System role not supported"),
    ("gemma2", [USER, USER], ALTERNATE),
    ("gemma2", [USER, ASSISTANT, ASSISTANT], ALTERNATE),
    ("gemma3", [SYSTEM, USER, USER], ALTERNATE),  # Gemma 3 takes the system message, not the two user turns
    ("gemma3", [ASSISTANT], ALTERNATE),
], ids=["gemma2-system", "gemma2-user-user", "gemma2-assistant-assistant", "gemma3-user-user",
        "gemma3-assistant-first"])
def test_gemma_refuses_as_transformers_does(tokenizers, family, messages, error):
    tokenizer, reference = tokenizers[family]
    with pytest.raises(TemplateError, match=f"^{re.escape(error)}$"):
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(LoraplexError) as info:  # a typed error: a 400 on `messages` at the HTTP edge
        tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert error in str(info.value)
    assert info.value.kind is ErrorKind.INVALID and info.value.field == "messages"


# End to end: a model directory whose tokenizer_config.json carries the Gemma 2 template, served over HTTP.

API_KEY = "family-templates-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def gemma2_model_dir(demo_dir, tmp_path_factory) -> Path:
    """The demo model (weights and tokenizer as they are: the vocabulary must fit the embedding) with Gemma
    2's chat template in its tokenizer_config.json."""
    out = tmp_path_factory.mktemp("gemma2-model") / "model"
    out.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(demo_dir / name, out / name)
    config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": GEMMA2_TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def gemma2_server(gemma2_model_dir, tmp_path_factory) -> Iterator[str]:
    options = {"model": str(gemma2_model_dir), "dtype": "float32", "device": "cpu", "max_model_len": 512,
               "kv_cache_memory": "64MiB", "data_dir": str(tmp_path_factory.mktemp("home")), "max_loras": 2,
               "max_lora_rank": 16}
    with run_server(options, ServerConfig(api_key=API_KEY)) as server:
        yield server.url


def test_the_server_answers_the_gemma2_templates_refusal_with_a_400_and_stays_up(gemma2_server, gemma2_model_dir):
    chat = f"{gemma2_server}/v1/chat/completions"
    refused = httpx.post(chat, headers=AUTH, timeout=60,
                         json={"model": "model", "messages": [SYSTEM, USER], "max_tokens": 2})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert "System role not supported" in error["message"], error
    assert error["param"] == "messages" and error["type"] == "invalid_request_error", error

    refused_again = httpx.post(f"{gemma2_server}/tokenize", headers=AUTH, timeout=60,
                               json={"model": "model", "messages": [USER, USER]})
    assert refused_again.status_code == 400, refused_again.text
    assert "Conversation roles must alternate" in refused_again.json()["error"]["message"]

    answered = httpx.post(chat, headers=AUTH, timeout=60,
                          json={"model": "model", "messages": [USER], "max_tokens": 2, "temperature": 0})
    assert answered.status_code == 200, answered.text
    reference = transformers.AutoTokenizer.from_pretrained(str(gemma2_model_dir))
    expected = reference.apply_chat_template([USER], tokenize=True, return_dict=False, add_generation_prompt=True)
    assert answered.json()["usage"]["prompt_tokens"] == len(expected)
    tokens = httpx.post(f"{gemma2_server}/tokenize", headers=AUTH, timeout=60,
                        json={"model": "model", "messages": [USER]}).json()["tokens"]
    assert tokens == list(expected)
