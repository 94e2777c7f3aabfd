"""Request bodies of the OpenAI-compatible endpoints. Known fields with a wrong type or range are refused.
A field that OpenAI or vLLM defines and loraplex does not implement is refused (400 naming it) when its
value would change the output, and taken at its no-op value (`REFUSED` below); fields that never change
the output are accepted (`ACCEPTED`). Fields in neither table are ignored, as OpenAI does, so that newer
clients keep working. Validators here raise LoraplexError, whose field the error handler reads (below
the model's own place in the body).

Every list a body may carry is bounded, and every stop string, so that what one request costs (to
validate, and again per sequence or per token) is bounded by the server, not by the client. Prompts and
messages are bounded by the model instead (`AsyncEngine.check_text_length`, before they are tokenized),
and the whole body by --max-body-size."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

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
MAX_MESSAGES = 2048  # OpenAI's own limit on a conversation
MAX_CONTENT_PARTS = 1024  # text parts of one message
MAX_PROMPTS = 2048  # prompts of one completion request: far above --max-choices, which is checked next
MAX_LOGIT_BIAS = 300  # token ids one logit_bias may name (OpenAI's limit)
MAX_MERGE_SOURCES = 16  # adapters one merge or one request's composition may name
MAX_TOOLS = 128  # tools of one chat request (OpenAI's limit)
MAX_GUIDED_CHOICES = 1024  # strings of one guided_choice (each becomes a branch of its grammar)
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


def _at_most_keys(limit: int, noun: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        if isinstance(value, dict) and len(value) > limit:
            raise invalid(None, f"at most {limit} {noun}, got {len(value)}")
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
    continuous_usage_stats: StrictBool | None = None  # vLLM's: usage in every chunk

    @model_validator(mode="after")
    def _no_continuous_usage(self) -> StreamOptions:
        if self.continuous_usage_stats:
            raise invalid("continuous_usage_stats", "not supported yet (usage is sent once, in the last chunk, "
                          "with include_usage); omit it or send false")
        return self


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


# ---------------------------------------------------------------------------------------------------
# Fields of OpenAI's and vLLM's request bodies that loraplex does not implement (OpenAI's API reference
# and client types; vLLM's ChatCompletionRequest and CompletionRequest). Each is refused with a 400 naming
# it unless its value is a no-op, which clients that send every default (LangChain) rely on; null is
# always a no-op. Listed per endpoint where OpenAI or vLLM take it there.
# ---------------------------------------------------------------------------------------------------

BOTH = ("completions", "chat")
CHAT = ("chat",)
COMPLETIONS = ("completions",)


@dataclass(frozen=True)
class Refused:
    """A field loraplex cannot honour: what it asks for that loraplex does not do, what to send instead,
    and which values of it are no-ops (taken)."""

    what: str
    instead: str
    noop: Callable[[Any, dict], bool]
    endpoints: tuple[str, ...] = BOTH

    def message(self) -> str:
        return f"not supported yet ({self.what}); {self.instead}"


def _same(value: Any, expected: Any) -> bool:
    """Equal, and of the same kind: `true` is not the number 1, nor `0` the boolean false."""
    if isinstance(value, bool) or isinstance(expected, bool):
        return value is expected
    if isinstance(expected, (int, float)):
        return type(value) in (int, float) and value == expected
    return type(value) is type(expected) and value == expected


def _noop(*values: Any) -> Callable[[Any, dict], bool]:
    """No-op when null or one of `values`."""
    return lambda value, body: value is None or any(_same(value, v) for v in values)


def _best_of_noop(value: Any, body: dict) -> bool:
    n = body.get("n")
    return value is None or _same(value, 1 if n is None else n)  # best of n out of n: every sequence


_GUIDED = ("structural tags are not supported (structured outputs take a JSON schema, a regex, a choice or a "
           "grammar)", "omit it; use guided_json, guided_regex, guided_choice or guided_grammar")
_TEMPLATE = "omit it; or render the prompt yourself and send it to /v1/completions"

REFUSED: tuple[tuple[str, Refused], ...] = (
    # OpenAI's
    ("best_of", Refused("sequences are not ranked; every one generated is returned", "omit it and ask for n "
                        "sequences with n (best_of equal to n is taken)", _best_of_noop)),
    ("echo", Refused("chat does not return the final message with the output (completions' echo is implemented)",
                     "omit it or send false; prepend the message yourself", _noop(False), CHAT)),
    ("suffix", Refused("no fill-in-the-middle", "omit it; or write the model's own fill-in-the-middle prompt",
                       _noop(), COMPLETIONS)),
    # (tools and tool_choice are implemented: loraplex.api.tools)
    ("functions", Refused("no function calling", "omit it or send []", _noop([]), CHAT)),
    ("function_call", Refused("no function calling", 'omit it or send "none" or "auto"', _noop("none", "auto"),
                              CHAT)),
    ("audio", Refused("text output only", "omit it", _noop(), CHAT)),
    ("modalities", Refused("text output only", 'omit it or send ["text"]', _noop(["text"]), CHAT)),
    ("web_search_options", Refused("no web search", "omit it; put what you found in the messages", _noop(), CHAT)),
    ("reasoning_effort", Refused("the chat template is not given a reasoning effort", "omit it", _noop(), CHAT)),
    ("verbosity", Refused("no verbosity control", 'omit it or send "medium"', _noop("medium"), CHAT)),
    ("moderation", Refused("no moderation of input or output", "omit it", _noop(), CHAT)),
    # vLLM's sampling parameters
    ("use_beam_search", Refused("no beam search", "omit it or send false", _noop(False))),
    ("length_penalty", Refused("it weighs beam search, which loraplex does not do", "omit it or send 1.0",
                               _noop(1))),
    ("truncate_prompt_tokens", Refused("prompts are never truncated; one too long is a 400", "omit it and "
                                       "shorten the prompt", _noop())),
    ("prompt_logprobs", Refused("no logprobs of the prompt's tokens", "omit it", _noop())),
    ("allowed_token_ids", Refused("sampling cannot be limited to some tokens", "omit it", _noop())),
    ("bad_words", Refused("words cannot be banned from the output", "omit it or send []", _noop([]))),
    ("logits_processors", Refused("no custom logits processors", "omit it or send []", _noop([]))),
    ("max_repetition_pattern_size", Refused("no stop on repeated token patterns", "omit it or send 0", _noop(0))),
    ("min_repetition_pattern_size", Refused("no stop on repeated token patterns", "omit it or send 0", _noop(0))),
    ("repetition_min_count", Refused("no stop on repeated token patterns", "omit it or send 0", _noop(0))),
    # vLLM's structured output
    # (guided_json, guided_regex, guided_choice, guided_grammar and structured_outputs are implemented)
    ("structural_tag", Refused(*_GUIDED, _noop())),
    ("guided_decoding_backend", Refused("structured outputs run on xgrammar only", 'omit it or send "xgrammar" '
                                        'or "auto"', _noop("xgrammar", "auto"))),
    ("guided_whitespace_pattern", Refused("JSON is written without free whitespace (one space after : and ,)",
                                          "omit it", _noop())),
    # vLLM's prompt and response options
    ("add_special_tokens", Refused("a chat prompt holds the chat template's special tokens only", "omit it or send "
                                   "false", _noop(False), CHAT)),
    ("add_special_tokens", Refused("a text prompt always gets the tokenizer's special tokens (BOS)", "omit it or "
                                   "send true; send token ids to choose every token", _noop(True), COMPLETIONS)),
    ("prompt_embeds", Refused("prompts are text or token ids", "omit it", _noop([]), COMPLETIONS)),
    ("include_reasoning", Refused("there is no reasoning parser: reasoning stays in the content", "omit it or "
                                  "send true", _noop(True), CHAT)),
    ("return_tokens_as_token_ids", Refused("logprobs name tokens by their text", "omit it or send false",
                                           _noop(False))),
    ("return_token_ids", Refused("responses carry no token ids", "omit it or send false", _noop(False))),
    ("kv_transfer_params", Refused("no disaggregated prefill (KV transfer)", "omit it", _noop())),
    ("vllm_xargs", Refused("no request extensions", "omit it or send {}", _noop({}))),
    # Not the output, but a promise that would silently not be kept: requests on one adapter share
    # prefix-cache blocks, so a salt asked for isolation that loraplex does not give.
    ("cache_salt", Refused("the prefix cache cannot be salted per request", "omit it; start the server with "
                           "--no-prefix-caching to share no cache", _noop())),
    # vLLM's chat template options (continue_final_message is implemented)
    ("chat_template", Refused("the server's chat template is used: the model's own, or --chat-template", _TEMPLATE,
                              _noop(), CHAT)),
    ("documents", Refused("the chat template is given no documents", "omit it or send []; put the documents in "
                          "the messages", _noop([]), CHAT)),
    ("mm_processor_kwargs", Refused("text models only: there is no multimodal processor", "omit it or send {}",
                                    _noop({}), CHAT)),
)

# Fields of OpenAI's or vLLM's that change nothing generated, taken and ignored (why, for docs/api.md).
ACCEPTED: dict[str, str] = {
    "user": "an end-user id for abuse monitoring",
    "safety_identifier": "an end-user id for abuse monitoring",
    "service_tier": "a billing and latency tier; every request is served alike",
    "store": "OpenAI keeps completions for its dashboard; loraplex keeps none",
    "metadata": "tags for stored completions; loraplex stores none",
    "prompt_cache_key": "a cache routing hint; caching never changes the output",
    "prompt_cache_retention": "a cache lifetime; caching never changes the output",
    "prompt_cache_options": "cache breakpoints and lifetime; caching never changes the output",
    "prediction": "predicted output only speeds generation up; the output is the model's either way",
    "parallel_tool_calls": "with tool_choice auto or required the model may make several calls either way",
    "priority": "scheduling order only (loraplex serves requests first come, first served)",
    "request_id": "vLLM's request id; loraplex's is the X-Request-Id header",
    "spaces_between_special_tokens": "vLLM applies it to slow (Python) tokenizers only; loraplex, like vLLM "
                                     "with a fast tokenizer, decodes with tokenizer.json, whatever the value",
}

_REFUSED_ON = {endpoint: {field: refused for field, refused in REFUSED if endpoint in refused.endpoints}
               for endpoint in BOTH}


def refuse_unsupported(body: Any, endpoint: str) -> None:
    """LoraplexError on the first field of `REFUSED` (in its order) that `body` sets to more than a no-op."""
    if not isinstance(body, dict):
        return  # not an object: the model's own validation says so
    for field, refused in _REFUSED_ON[endpoint].items():
        if field in body and not refused.noop(body[field], body):
            raise invalid(field, refused.message())



class StructuredFields(_Body):
    """Structured outputs: at most one of these per request (loraplex.api.structured reads them)."""

    response_format: dict[StrictStr, Any] | None = None  # OpenAI's: text, json_object or json_schema
    guided_json: dict[StrictStr, Any] | StrictStr | None = None  # vLLM's: a JSON schema
    guided_regex: StrictStr | None = None
    guided_choice: Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_GUIDED_CHOICES)] | None = None
    guided_grammar: StrictStr | None = None  # EBNF, as xgrammar reads it (GBNF-like)
    structured_outputs: dict[StrictStr, Any] | None = None  # vLLM's newer: {"json" | "regex" | ...: ...}


class SamplingFields(StructuredFields):
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
    user: StrictStr | None = None
    # Beyond OpenAI, as vLLM takes them:
    top_k: StrictInt | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    # Logits processing, per sequence (OpenAI's ranges; repetition_penalty and min_tokens are vLLM's)
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0)] | None = None
    logit_bias: Annotated[dict[StrictStr, Annotated[Number, Field(ge=-100, le=100)]],
                          _at_most_keys(MAX_LOGIT_BIAS, "logit_bias entries")] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    # loraplex's own: a composition of served adapters instead of one (model names the base model)
    adapters: Annotated[list[MergeSource], Field(min_length=1, max_length=MAX_MERGE_SOURCES)] | None = None
    merge: MergeOptions | None = None

    ENDPOINT: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        refuse_unsupported(data, cls.ENDPOINT)
        return data

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "only allowed when stream is true")
        return self


class CompletionRequest(SamplingFields):
    ENDPOINT = "completions"

    prompt: Annotated[StrictStr | TokenIds | Annotated[list[StrictStr], Field(min_length=1)] | Annotated[
        list[TokenIds], Field(min_length=1)], _at_most(MAX_PROMPTS, "prompts", _num_prompts)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    echo: StrictBool | None = None  # the prompt's text before the output


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[StrictStr | list[TextPart] | None, _at_most(MAX_CONTENT_PARTS, "parts")] = None
    name: StrictStr | None = None
    tool_calls: Annotated[list[dict[StrictStr, Any]], Field(max_length=MAX_TOOLS)] | None = None  # assistant's
    tool_call_id: StrictStr | None = None  # a tool message's: the call it answers

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

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (tool calls and the call a tool answers included)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [_parsed_arguments(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def _parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call with its arguments as an object (OpenAI sends them as JSON text; templates write them
    out with tojson, as transformers expects)."""
    function = call.get("function")
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        with contextlib.suppress(ValueError):
            function = {**function, "arguments": json.loads(function["arguments"])}
        return {**call, "function": function}
    return call


# chat_template_kwargs: extra variables for the chat template (e.g. Qwen3's enable_thinking), as
# transformers' apply_chat_template(**kwargs) passes them. Bounded; plain JSON values only; never the
# variables loraplex itself gives the template.
MAX_TEMPLATE_KWARGS = 32
RESERVED_TEMPLATE_NAMES = frozenset({"messages", "add_generation_prompt", "continue_final_message", "bos_token",
                                     "eos_token", "tools", "documents", "raise_exception", "strftime_now"})
TemplateValue = StrictBool | StrictInt | StrictFloat | Annotated[StrictStr, Field(max_length=4096)] | None
TemplateKwargs = Annotated[dict[Annotated[StrictStr, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")], TemplateValue],
                           Field(max_length=MAX_TEMPLATE_KWARGS)]


def _check_template_kwargs(kwargs: dict[str, Any] | None) -> None:
    for name in kwargs or ():
        if name in RESERVED_TEMPLATE_NAMES:
            raise invalid("chat_template_kwargs", f"'{name}' is set by the server (or by its own field); use "
                          "another name, or the request's own field for it")


class ChatCompletionRequest(SamplingFields):
    ENDPOINT = "chat"

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    tools: Annotated[list[dict[StrictStr, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: StrictStr | dict[StrictStr, Any] | None = None  # "none" | "auto" | "required" | a function
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    add_generation_prompt: StrictBool = True
    # vLLM's: the final (assistant) message is left open and continued (a prefill). Also what
    # add_generation_prompt false means when the final message is the assistant's.
    continue_final_message: StrictBool = False
    chat_template_kwargs: TemplateKwargs | None = None  # vLLM's: extra variables for the chat template

    @model_validator(mode="after")
    def _continue_an_assistant_message(self) -> ChatCompletionRequest:
        _check_template_kwargs(self.chat_template_kwargs)
        if not self.continue_final_message:
            return self
        if self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
            raise invalid("continue_final_message", "continues the final message, so it cannot go with "
                          "add_generation_prompt true, which starts a new one; send add_generation_prompt false")
        if self.messages[-1].role != "assistant":
            raise invalid("continue_final_message", f"the final message is the {self.messages[-1].role}'s; only "
                          "an assistant message can be continued (send its start as the last message)")
        return self

    @property
    def continues_final_message(self) -> bool:
        """Whether the prompt leaves the final (assistant) message open for the model to continue."""
        explicit = self.continue_final_message
        return explicit or (not self.add_generation_prompt and self.messages[-1].role == "assistant")


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


class TokenizeRequest(_Body):
    """vLLM's POST /tokenize: a text prompt, or chat messages through the chat template."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: StrictBool | None = None  # default: true for a prompt, false for messages (vLLM)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: TemplateKwargs | None = None
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        _check_template_kwargs(self.chat_template_kwargs)
        if (self.prompt is None) == (self.messages is None):
            raise invalid("prompt", "send either prompt (a text) or messages (a conversation), not both or neither")
        if self.messages is not None and self.add_special_tokens:
            raise invalid("add_special_tokens", "messages get the chat template's special tokens only; omit it "
                          "or send false")
        if self.continue_final_message and self.add_generation_prompt and \
                "add_generation_prompt" in self.model_fields_set:
            raise invalid("continue_final_message", "cannot go with add_generation_prompt true; send "
                          "add_generation_prompt false")
        return self


class DetokenizeRequest(_Body):
    """vLLM's POST /detokenize."""

    model: StrictStr | None = None
    tokens: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=1 << 20)]
