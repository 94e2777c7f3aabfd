"""Request bodies of the OpenAI-compatible endpoints. Unknown fields are ignored, as OpenAI does;
known fields with a wrong type or range are refused. Validators here raise LoraplexError, whose field
the error handler reads (below the model's own place in the body).

Every list a body may carry is bounded, and every stop string, so that what one request costs (to
validate, and again per sequence or per token) is bounded by the server, not by the client. Prompts and
messages are bounded by the model instead (`AsyncEngine.check_text_length`, before they are tokenized),
and the whole body by --max-body-size."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from loraplex.arithmetic import MergeParams
from loraplex.errors import invalid

MAX_STOP_STRINGS = 16  # OpenAI takes 4; each one is searched for after every token
MAX_STOP_CHARS = 1024  # per stop string: a delimiter, not a document (searched for after every token)
MAX_STOP_TOKEN_IDS = 1024  # a stop set beyond a thousand tokens of a vocabulary is not a stop condition
MAX_LOGIT_BIAS = 300  # OpenAI's own limit (logit_bias is refused here, but read before it is refused)
MAX_MESSAGES = 2048  # OpenAI's own limit on a conversation
MAX_CONTENT_PARTS = 1024  # text parts of one message
MAX_PROMPTS = 2048  # prompts of one completion request: far above --max-choices, which is checked next
MAX_TOOLS = 128  # OpenAI's own limit (tools are refused here, but read before they are refused)
MAX_MERGE_SOURCES = 16  # adapters one merge or one request's composition may name
# Lists and objects in one body. Each costs a Python object to validate, in C that holds the GIL: four
# million `[0]` lists (16 MiB) took 4.5 s. A body within the limits above needs a few thousand.
MAX_JSON_CONTAINERS = 65_536
_JSON_TOKENS = re.compile(rb'\\.|["\[{]')  # an escape, a quote, or an opening bracket

Number = StrictFloat  # strict: ints are taken, strings and booleans are not
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


def check_json_containers(raw: bytes) -> None:
    """LoraplexError for a JSON text of more than MAX_JSON_CONTAINERS lists and objects, before it is
    parsed. Counting brackets is enough almost always; only a body with more of them (some inside
    strings) is scanned token by token, in Python, which lets other threads run between tokens."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_CONTAINERS:
        return
    count, in_string = 0, False
    for match in _JSON_TOKENS.finditer(raw):
        token = match.group()
        if token == b'"':
            in_string = not in_string
        elif not in_string and token in (b"[", b"{"):
            count += 1
            if count > MAX_JSON_CONTAINERS:
                raise invalid(None, f"the body has more than {MAX_JSON_CONTAINERS} JSON lists and objects")


def _at_most(limit: int, noun: str, count: Callable[[Any], int] = len) -> BeforeValidator:
    """Refuses a list of more than `limit` items before its items are validated (a union would validate
    them once per alternative, and report each alternative's failure)."""

    def check(value: Any) -> Any:
        if isinstance(value, list) and count(value) > limit:
            raise invalid(None, f"at most {limit} {noun}, got {count(value)}")
        return value

    return BeforeValidator(check)


def _num_prompts(prompt: list) -> int:
    return len(prompt) if prompt and isinstance(prompt[0], (str, list)) else 1  # else one prompt of token ids


def _check_stop_chars(stop: Any) -> Any:
    for text in [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []:
        if isinstance(text, str) and len(text) > MAX_STOP_CHARS:
            raise invalid(None, f"a stop string has at most {MAX_STOP_CHARS} characters, got {len(text)}")
    return stop


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class MergeSource(_Body):
    """One input of a merge or a composition: a served adapter and its weight (MWA: its metrics)."""

    name: StrictStr
    weight: Number = 1.0
    loss: Annotated[Number, Field(gt=0)] | None = None
    step: Annotated[StrictInt, Field(gt=0)] | None = None


class MergeOptions(_Body):
    """A merge's method and parameters (loraplex.arithmetic.MergeParams checks their values)."""

    method: StrictStr
    space: StrictStr = "parameter"
    density: Number | None = None
    rank: StrictInt | None = None
    majority_sign: StrictStr = "total"
    seed: StrictInt = 0
    metric: StrictStr = "loss"
    metric_values: Annotated[list[Number], Field(max_length=MAX_MERGE_SOURCES)] | None = None
    penalty: Number = 1.0
    keep_ratio: Number = 0.2
    clamp_ratio: Number = 0.2
    fuse_weight: Number = 2.0

    def params(self) -> MergeParams:
        fields = self.model_dump(exclude={"name", "sources", "replace"})
        if fields["metric_values"] is not None:
            fields["metric_values"] = tuple(fields["metric_values"])
        return MergeParams(**fields)


class SamplingFields(_Body):
    """What completions and chat share."""

    model: StrictStr
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[StrictStr | list[StrictStr] | None, _at_most(MAX_STOP_STRINGS, "stop strings"),
                    BeforeValidator(_check_stop_chars)] = None
    seed: StrictInt | None = None
    presence_penalty: Number = 0
    frequency_penalty: Number = 0
    logit_bias: Annotated[dict[str, Any], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: StrictStr | None = None
    # Beyond OpenAI, as vLLM takes them:
    top_k: StrictInt | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    # loraplex's own: a composition of served adapters instead of one (model names the base model)
    adapters: Annotated[list[MergeSource], Field(min_length=1, max_length=MAX_MERGE_SOURCES)] | None = None
    merge: MergeOptions | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "only allowed when stream is true")
        return self


class CompletionRequest(SamplingFields):
    prompt: Annotated[StrictStr | TokenIds | Annotated[list[StrictStr], Field(min_length=1)] | Annotated[
        list[TokenIds], Field(min_length=1)], _at_most(MAX_PROMPTS, "prompts", _num_prompts)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[StrictStr | list[TextPart] | None, _at_most(MAX_CONTENT_PARTS, "parts")] = None
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        # Only an assistant turn may come without content (OpenAI: when it made tool calls).
        if self.role != "assistant" and (self.content is None or self.content == []):
            raise invalid("content", f"a {self.role} message needs content (a string or text parts)")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(_Body):
    type: StrictStr


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Any], Field(max_length=MAX_TOOLS)] | None = None
    add_generation_prompt: StrictBool = True


class MergeRequest(MergeOptions):
    """POST /v1/adapters/merge: a new stored adapter made of served ones."""

    name: StrictStr
    sources: Annotated[list[MergeSource], Field(min_length=1, max_length=MAX_MERGE_SOURCES)]
    replace: StrictBool = False


class LoadLoRARequest(_Body):
    """vLLM's POST /v1/load_lora_adapter."""

    lora_name: StrictStr
    lora_path: StrictStr
    load_inplace: StrictBool = False


class UnloadLoRARequest(_Body):
    """vLLM's POST /v1/unload_lora_adapter."""

    lora_name: StrictStr
    lora_int_id: StrictInt | None = None
