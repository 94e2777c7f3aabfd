"""chat_template_kwargs (vLLM's): extra variables for the chat template, such as Qwen3's enable_thinking. The
server's prompt is transformers' `apply_chat_template(..., **kwargs)` rendering, on /v1/chat/completions
and /tokenize; names the server sets itself, and values that are not plain JSON scalars, are refused."""

from __future__ import annotations

import httpx
import pytest
import transformers
from server_harness import API_KEY, engine_options, run_server

from loraplex.config import ServerConfig

# Qwen3's way: with enable_thinking false, the assistant turn starts with an empty think block.
THINKING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% if persona is defined %}{{ persona + ': ' }}{% endif %}{% endif %}"
)
USER = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "What is two plus two?"}]


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    options = engine_options(demo_dir, tmp_path_factory.mktemp("home"), chat_template=str(template))
    with run_server(options, ServerConfig(api_key=API_KEY)) as live:
        yield live


@pytest.fixture(scope="module")
def reference(demo_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(demo_dir))

    def ids(**kwargs) -> list[int]:
        text = tokenizer.apply_chat_template(MESSAGES, chat_template=THINKING_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True, **kwargs)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return ids


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True},
                                    {"enable_thinking": False, "persona": "Ada"}])
def test_the_prompt_is_transformers_rendering_with_the_kwargs(server, reference, kwargs):
    body = {"model": "demo", "messages": MESSAGES, "chat_template_kwargs": kwargs}
    tokens = httpx.post(f"{server.url}/tokenize", headers=USER, json=body, timeout=60).json()["tokens"]
    assert tokens == reference(**kwargs)
    chat = httpx.post(f"{server.url}/v1/chat/completions", headers=USER, timeout=60,
                      json={**body, "max_tokens": 1, "temperature": 0})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == len(reference(**kwargs))


def test_the_kwargs_change_the_prompt(reference):
    assert reference(enable_thinking=False) != reference() == reference(enable_thinking=True)


@pytest.mark.parametrize("kwargs", [{"messages": "x"}, {"add_generation_prompt": False}, {"bos_token": "x"},
                                    {"nested": {"a": 1}}, {"list": [1, 2]}, {"bad-name": 1},
                                    {f"k{i}": i for i in range(33)}])
def test_reserved_names_and_non_scalar_values_are_refused(server, kwargs):
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=USER, timeout=60,
                          json={"model": "demo", "messages": MESSAGES, "chat_template_kwargs": kwargs})
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["param"] or "chat_template_kwargs").startswith("chat_template_kwargs")
    assert "chat_template_kwargs" in response.json()["error"]["message"]
