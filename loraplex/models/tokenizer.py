"""Tokenizer, special tokens and chat template of a Hugging Face model directory."""

from __future__ import annotations

import functools
import json
import re
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from loraplex.errors import LoraplexError, invalid


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool | None = None,
        chat_template: str | None = None,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        own_eos = backend.token_to_id(eos_token) if eos_token else None
        self.eos_token_ids = tuple(dict.fromkeys([*eos_token_ids, *([own_eos] if own_eos is not None else [])]))
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._compiled_template = None
        self._added_ids: set[int] | None = None
        self._byte_level = False

    @classmethod
    def from_dir(cls, model_dir: Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; loraplex reads the fast-tokenizer file tokenizer.json")
        config = _read_json(model_dir / "tokenizer_config.json")
        generation = _read_json(model_dir / "generation_config.json")
        gen_eos = generation.get("eos_token_id")
        if gen_eos is not None:
            eos_token_ids = tuple(gen_eos) if isinstance(gen_eos, list) else (gen_eos,)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        template_file = model_dir / "chat_template.jinja"
        if template is None and template_file.exists():
            template = template_file.read_text()
        return cls(
            HFTokenizer.from_file(str(path)),
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            add_bos_token=config.get("add_bos_token"),
            chat_template=template,
            eos_token_ids=eos_token_ids,
        )

    @classmethod
    def from_path(cls, path: Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
        """From a checkpoint directory, or from the metadata of a GGUF file."""
        from loraplex.models.loader import is_gguf

        if not is_gguf(path):
            return cls.from_dir(path, eos_token_ids)
        from loraplex.models.gguf import read_gguf

        checkpoint = read_gguf(path)
        config = checkpoint.tokenizer_config
        eos = checkpoint.generation_config.get("eos_token_id")
        return cls(checkpoint.tokenizer, bos_token=config.get("bos_token"), eos_token=config.get("eos_token"),
                   add_bos_token=config.get("add_bos_token"), chat_template=config.get("chat_template"),
                   eos_token_ids=(eos,) if eos is not None else eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._with_bos(self.backend.encode(text, add_special_tokens=add_special_tokens).ids,
                              add_special_tokens)

    def encode_many(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Like `encode` for each text; the tokenizer lets go of the GIL meanwhile (plain `encode`
        holds it), so a server's other threads keep running while long prompts are tokenized."""
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [self._with_bos(e.ids, add_special_tokens) for e in encodings]

    def _with_bos(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        # Some tokenizer.json files leave BOS to the Python tokenizer class; honour add_bos_token here.
        needs_bos = add_special_tokens and self.add_bos_token and self.bos_token_id is not None
        if needs_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes one token stands for: a text of n bytes is at least n / this many tokens."""
        return max((len(self.token_bytes(i)) for i in range(self.vocab_size)), default=1) or 1

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, also when it holds only part of a multi-byte character
        (which `decode` turns into U+FFFD): joined over a text's tokens, they give the text back."""
        if self._added_ids is None:
            self._added_ids = set(self.backend.get_added_tokens_decoder())
            self._byte_level = type(self.backend.decoder).__name__ == "ByteLevel"
        piece = self.backend.id_to_token(token_id)
        match = None if piece is None or self._byte_level else _BYTE_FALLBACK.fullmatch(piece)
        if match:  # SentencePiece style: <0xE2> is one byte; "▁" a space
            return bytes([int(match.group(1), 16)])
        if piece is None or token_id in self._added_ids:
            return self.decode([token_id], skip_special_tokens=False).encode()
        if self._byte_level:  # GPT-2 style: every byte is drawn as one printable character
            if all(c in _UNICODE_TO_BYTE for c in piece):
                return bytes(_UNICODE_TO_BYTE[c] for c in piece)
            return piece.encode()
        return piece.replace("\u2581", " ").encode()

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **kwargs: Any) -> str:
        """The conversation as the model's chat template renders it. `continue_final_message`: the
        final message is left open (nothing the template writes after its content, such as an
        end-of-turn token), for the model to continue it (a prefill); as transformers renders it."""
        if not self.chat_template:
            raise invalid("messages", "this model has no chat template (tokenizer_config.json `chat_template` or "
                          "chat_template.jinja); send a plain prompt to the completions API instead")
        if self._compiled_template is None:
            self._compiled_template = _compile(self.chat_template)
        if continue_final_message and add_generation_prompt:
            raise invalid("continue_final_message", "cannot go with add_generation_prompt, which starts a new message")
        try:
            if continue_final_message:
                return self._render_open(messages, **kwargs)
            return self._render(messages, add_generation_prompt, **kwargs)
        except LoraplexError:
            raise
        except Exception as e:  # noqa: BLE001 - the template's raise_exception (Gemma 2 on a system message), or
            # any error of the template's own code on these messages: the caller's request is at fault
            raise invalid("messages", f"the model's chat template refused them: {e}") from None

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, **kwargs: Any) -> str:
        return self._compiled_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def _render_open(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """The conversation rendered, then cut right after the final message's content. The content is
        found by a marker appended to it (a random one, which no message holds), as transformers'
        `continue_final_message` does: a template that trims the content trims the marker's trailing
        space too, and then the text before it is trimmed as well."""
        if not messages:
            raise invalid("messages", "there is no final message to continue")
        final = messages[-1]
        content = final.get("content")
        if not isinstance(content, str):  # None: an assistant turn without text, continued from its start
            content = ""
        marker = f"LORAPLEX_CONTINUE_{secrets.token_hex(8).upper()}"  # upper: survives an `upper` filter
        text = self._render([*messages[:-1], {**final, "content": content + marker + " "}], False, **kwargs)
        at = text.rfind(marker)
        if at < 0:
            raise invalid("messages", "the chat template does not write the final message's content, so it cannot "
                          "be continued; render the prompt yourself and send it to /v1/completions")
        if text.startswith(" ", at + len(marker)):
            return text[:at]
        return text[:at].rstrip()  # the template trimmed the content (and so the marker's space)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte -> printable character map, inverted: printable bytes stand for themselves, the
    others are drawn as the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(0x100 + i) for i, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


_UNICODE_TO_BYTE = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_text(token: str | dict | None) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    return token.get("content") if isinstance(token, dict) else token


def _raise(message: str) -> None:
    raise TemplateError(message)


def _compile(template: str):
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
