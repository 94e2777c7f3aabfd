"""A model without a chat template refuses chat with a typed error on `messages`: the API maps it to a 400
with that param by the error's field, not its text."""

from __future__ import annotations

import pytest

from loraplex.errors import ErrorKind, LoraplexError
from loraplex.models.tokenizer import Tokenizer


def test_a_model_without_a_chat_template_refuses_chat_on_messages(demo_dir):
    tokenizer = Tokenizer.from_path(demo_dir)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])  # the demo model has one
    tokenizer.chat_template = None
    with pytest.raises(LoraplexError, match="no chat template") as info:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert info.value.field == "messages" and info.value.kind is ErrorKind.INVALID
