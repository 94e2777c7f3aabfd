"""OpenAI-compatible inference: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import codecs
import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.types import Message, Receive, Scope, Send

import loraplex
from loraplex.api.compose import resolve_adapter
from loraplex.api.errors import APIError, error_body, validation_error
from loraplex.api.generation import Generation, GenerationError, stopped_by_server
from loraplex.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    check_json_containers,
)
from loraplex.api.state import ServerState, State
from loraplex.api.structured import compiled_guide
from loraplex.api.tools import ToolPlan, plan_tools, tool_call_chunks, tool_choices
from loraplex.engine.llm_engine import RequestOutput
from loraplex.engine.output import TokenLogprob
from loraplex.engine.sampling import SamplingParams
from loraplex.errors import LoraplexError
from loraplex.models.tokenizer import Tokenizer

router = APIRouter()
Body = TypeVar("Body", CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)


@router.get("/v1/models")
async def list_models(state: State) -> dict[str, Any]:
    names = sorted(state.registry.infos)
    return {"object": "list", "data": [_model_card(state, None), *(_model_card(state, name) for name in names)]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, state: State) -> dict[str, Any]:
    return _model_card(state, state.resolve(model))


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": loraplex.__version__}


@router.post("/tokenize")
async def tokenize(request: Request, state: State) -> dict[str, Any]:
    """vLLM's: a prompt's token ids (with the tokenizer's special tokens unless add_special_tokens is
    false), or a conversation's through the chat template. An adapter's name works as `model`: adapters
    share the base model's tokenizer."""
    body = await _parse(request, TokenizeRequest)
    if body.model is not None:
        state.resolve(body.model)  # 404 for a model that is not served
    engine = state.engine
    tokenizer = engine.engine.tokenizer
    if body.prompt is not None:
        engine.check_text_length(body.prompt)
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = await asyncio.to_thread(tokenizer.encode, body.prompt, add_special)
    else:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            extra = body.chat_template_kwargs or {}
            if body.continue_final_message:
                tokens = await engine.encode_chat(messages, False, continue_final_message=True, template_kwargs=extra)
            else:
                tokens = await engine.encode_chat(messages, body.add_generation_prompt, template_kwargs=extra)
        except LoraplexError:
            raise
        except Exception as e:  # the template's own raise_exception, or a template error
            raise APIError(400, f"messages: the model's chat template refused them: {e}", param="messages") from None
    out: dict[str, Any] = {"count": len(tokens), "max_model_len": engine.engine.max_model_len, "tokens": tokens}
    if body.return_token_strs:
        out["token_strs"] = [_token_text(tokenizer, t) for t in tokens]
    return out


@router.post("/detokenize")
async def detokenize(request: Request, state: State) -> dict[str, str]:
    """vLLM's: token ids back to text, special tokens included."""
    body = await _parse(request, DetokenizeRequest)
    if body.model is not None:
        state.resolve(body.model)
    engine = state.engine.engine
    vocab = engine.model.config.vocab_size
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise APIError(400, f"tokens: token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    text = await asyncio.to_thread(engine.tokenizer.decode, body.tokens, False)
    return {"prompt": text}


def _model_card(state: ServerState, adapter: str | None) -> dict[str, Any]:
    if adapter is None:
        return {"id": state.base_name, "object": "model", "created": state.created, "owned_by": "loraplex",
                "root": state.base_name, "parent": None}
    return {"id": adapter, "object": "model", "created": state.registry.infos[adapter].created,
            "owned_by": "loraplex", "root": adapter, "parent": state.base_name}


async def _parse(request: Request, model: type[Body]) -> Body:
    """The body, parsed and validated in a worker thread: the event loop is held only while it arrives
    (at most --max-body-size, which the middleware checks first)."""
    raw = await request.body()
    try:
        return await asyncio.to_thread(_validate, model, raw)
    except json.JSONDecodeError as e:  # where it went wrong, not a field: there are no fields yet
        raise APIError(400, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} "
                       f"(character {e.pos})") from None
    except UnicodeDecodeError as e:  # JSON text is UTF-8 (or UTF-16/32, which json.loads detects)
        line, column = _line_column(raw, e.start)
        raise APIError(400, f"the body is not valid JSON: it is not {e.encoding.upper()} text at line {line} "
                       f"column {column} (byte {e.start}: {e.reason})") from None
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def _validate(model: type[Body], raw: bytes) -> Body:
    check_json_containers(raw)
    # json.loads, not pydantic's parser: it keeps a lone surrogate ("\\ud800"), which JSON allows, for the
    # field's own error to name.
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise APIError(400, f"the body must be a JSON object, got {_JSON_TYPES.get(type(body), 'a value')}")
    return model.model_validate(body)


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def _line_column(raw: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column (in bytes) of a byte offset."""
    return raw.count(b"\n", 0, offset) + 1, offset - (raw.rfind(b"\n", 0, offset) + 1) + 1


@router.post("/v1/completions")
async def completions(request: Request, state: State):
    body = await _parse(request, CompletionRequest)
    adapter = await resolve_adapter(state, body)
    prompts = _prompt_list(body.prompt)
    _check_choices(state, len(prompts) * body.n)
    params = _params(body, body.max_tokens, body.logprobs)
    if body.echo and body.logprobs is not None:
        params.prompt_logprobs = body.logprobs  # (params is this request's own object)
    params.guide = await compiled_guide(state, body)  # structured output; a bad schema is a 400 here
    items = [(prompt, params.for_choice(j)) for prompt in prompts for j in range(body.n)]
    generation = Generation(state, body.model, adapter, "cmpl", request.state.request_id)
    await generation.submit(items)
    tokenizer = state.engine.engine.tokenizer
    if body.stream:
        chunks = _completion_chunks(generation, body, tokenizer, prompts)
        return ClosingStreamingResponse(generation, "/v1/completions", chunks)
    outputs = await _collect(generation, request, "/v1/completions")
    choices = []
    for i, out in enumerate(outputs):
        offsets = TextOffsets()
        text, logprobs = out.text, None
        if body.echo:
            prompt_text, prompt_logprobs = _echo(out, prompts[i // body.n], body.logprobs is not None, tokenizer,
                                                 offsets)
            text = prompt_text + text
        if body.logprobs is not None:
            logprobs = _completion_logprobs(out.logprobs, tokenizer, offsets)
            if body.echo:
                logprobs = {key: prompt_logprobs[key] + value for key, value in logprobs.items()}
        choices.append({"index": i, "text": text, "finish_reason": out.finish_reason, "logprobs": logprobs})
    return {"id": generation.id, "object": "text_completion", "created": generation.created, "model": body.model,
            "choices": choices, "usage": generation.usage(body.n)}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: State):
    body = await _parse(request, ChatCompletionRequest)
    adapter = await resolve_adapter(state, body)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
    _check_choices(state, body.n)  # the cheap checks before the template and the tokenizer run
    tokenizer = state.engine.engine.tokenizer
    tool_plan: ToolPlan | None = plan_tools(body, tokenizer.chat_template)  # a 400 when tools cannot be rendered
    tools = tool_plan.tools if tool_plan is not None else None
    messages = [m.for_template() for m in body.messages]
    try:
        extra = body.chat_template_kwargs or {}
        if body.continues_final_message:  # a prefill: the final assistant message is left open and continued
            prompt = await state.engine.encode_chat(messages, False, continue_final_message=True, tools=tools,
                                                    template_kwargs=extra)
        else:
            prompt = await state.engine.encode_chat(messages, body.add_generation_prompt, tools=tools,
                                                    template_kwargs=extra)
    except LoraplexError:
        raise  # the app's handler maps it (no chat template: 400 on messages)
    except Exception as e:  # the template's own raise_exception, or a template error
        raise APIError(400, f"messages: the model's chat template refused them: {e}", param="messages") from None
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = max(state.engine.engine.max_model_len - len(prompt), 1)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _params(body, max_tokens, logprobs)
    params.guide = await compiled_guide(state, body)  # structured output; a bad schema is a 400 here
    if tool_plan is not None and tool_plan.guide is not None:  # tool_choice required or a named function
        params.guide = await tool_plan.compiled_guide(state, params.guide)
    items = [(prompt, params.for_choice(j)) for j in range(body.n)]
    generation = Generation(state, body.model, adapter, "chatcmpl", request.state.request_id)
    await generation.submit(items)
    if body.stream:
        chunks = _chat_chunks(generation, body, tokenizer)
        if tool_plan is not None:
            chunks = tool_call_chunks(tool_plan, chunks)
        return ClosingStreamingResponse(generation, "/v1/chat/completions", chunks)
    outputs = await _collect(generation, request, "/v1/chat/completions")
    choices = [{"index": i, "message": {"role": "assistant", "content": out.text}, "finish_reason": out.finish_reason,
                "logprobs": {"content": _chat_logprobs(out.logprobs, tokenizer)} if body.logprobs else None}
               for i, out in enumerate(outputs)]
    if tool_plan is not None:
        tool_choices(tool_plan, choices)
    return {"id": generation.id, "object": "chat.completion", "created": generation.created, "model": body.model,
            "choices": choices, "usage": generation.usage(body.n)}


def _check_choices(state: ServerState, count: int) -> None:
    """Before anything is built per sequence: a request's size is bounded by the server, not the client."""
    if count > state.config.max_choices:
        raise APIError(400, f"n: this request asks for {count} sequences (prompts x n); the server allows "
                       f"{state.config.max_choices} (--max-choices)", param="n")


def _prompt_list(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _params(body: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """The request's params, once: choice j runs on `params.for_choice(j)`, which shares them. Raises
    LoraplexError naming the field (`top_k`) that the body's types allow but sampling does not."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 16,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        seed=body.seed,
        stop=stop,
        stop_token_ids=body.stop_token_ids or [],
        ignore_eos=body.ignore_eos,
        include_stop_str_in_output=body.include_stop_str_in_output,
        logprobs=logprobs,
        skip_special_tokens=body.skip_special_tokens,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=_logit_bias(body.logit_bias),
        min_tokens=body.min_tokens or 0,
    )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias: token ids as JSON object keys (strings of decimal integers)."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not key.isascii() or not key.isdigit():
            raise APIError(400, f"logit_bias: keys must be token ids (decimal integers), got {key!r}",
                           param="logit_bias")
        out[int(key)] = float(value)
    return out


async def _collect(generation: Generation, request: Request, endpoint: str) -> list[RequestOutput]:
    try:
        outputs = await generation.collect(request)
    except GenerationError as e:
        generation.log(endpoint, e.status)
        raise APIError(e.status, str(e), code=e.code) from None
    except APIError as e:
        generation.log(endpoint, e.status)
        raise
    generation.log(endpoint, 200)
    return outputs


def _event(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


_DONE = _event("[DONE]")


class ClosingStreamingResponse(StreamingResponse):
    """A generation's server-sent events. Closes its body generator however the response ends: Starlette
    leaves a generator whose client disconnected to the garbage collector; closing it here aborts the
    request's sequences at once. A stream the server stops (its shutdown grace ran out) ends with an
    error event and [DONE]."""

    def __init__(self, generation: Generation, endpoint: str, chunks: AsyncIterator[dict[str, Any]]) -> None:
        super().__init__(self._events(chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation
        self.endpoint = endpoint
        self.status = 499  # until the stream ends otherwise: a client that went away

    async def _events(self, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield _event(chunk)
            self.status = 200
        except GenerationError as e:
            self.status = e.status
            yield _event(error_body(e.status, str(e)))
        finally:
            await self.generation.close()
        yield _DONE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_started(message: Message) -> None:
            nonlocal started
            await send(message)
            started = started or message["type"] == "http.response.start"

        try:
            await super().__call__(scope, receive, send_started)
        except asyncio.CancelledError:
            error = stopped_by_server()
            self.status = error.status
            with anyio.CancelScope(shield=True):
                if not started:
                    await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                body = _event(error_body(error.status, str(error), code=error.code)) + _DONE
                await send({"type": "http.response.body", "body": body.encode(), "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self.generation.log(self.endpoint, self.status)


async def _completion_chunks(generation: Generation, body: CompletionRequest, tokenizer: Tokenizer,
                             prompts: list[str | list[int]]) -> AsyncIterator[dict[str, Any]]:
    sent_logprobs = [0] * len(generation.streams)
    offsets = [TextOffsets() for _ in generation.streams]
    echo_pending = [bool(body.echo)] * len(generation.streams)  # the prompt goes in a choice's first chunk
    async for index, out in generation.outputs():
        if not out.delta_text and not out.finished and not echo_pending[index]:
            continue
        text, logprobs, prompt_logprobs = out.delta_text, None, None
        if echo_pending[index]:
            echo_pending[index] = False
            prompt_text, prompt_logprobs = _echo(out, prompts[index // body.n], body.logprobs is not None,
                                                 tokenizer, offsets[index])
            text = prompt_text + text
        if body.logprobs is not None and out.logprobs is not None:
            logprobs = _completion_logprobs(out.logprobs[sent_logprobs[index]:], tokenizer, offsets[index])
            sent_logprobs[index] = len(out.logprobs)
            if prompt_logprobs is not None:
                logprobs = {key: prompt_logprobs[key] + value for key, value in logprobs.items()}
        choice = {"index": index, "text": text, "logprobs": logprobs,
                  "finish_reason": out.finish_reason if out.finished else None}
        yield {"id": generation.id, "object": "text_completion", "created": generation.created,
               "model": body.model, "choices": [choice]}
    if body.stream_options is not None and body.stream_options.include_usage:
        yield {"id": generation.id, "object": "text_completion", "created": generation.created, "model": body.model,
               "choices": [], "usage": generation.usage(body.n)}


async def _chat_chunks(generation: Generation, body: ChatCompletionRequest,
                       tokenizer: Tokenizer) -> AsyncIterator[dict[str, Any]]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": generation.id, "object": "chat.completion.chunk", "created": generation.created,
                "model": body.model, "choices": choices, **extra}

    for index in range(len(generation.streams)):
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    sent_logprobs = [0] * len(generation.streams)
    async for index, out in generation.outputs():
        if not out.delta_text and not out.finished:
            continue
        logprobs = None
        if body.logprobs and out.logprobs is not None:
            logprobs = {"content": _chat_logprobs(out.logprobs[sent_logprobs[index]:], tokenizer)}
            sent_logprobs[index] = len(out.logprobs)
        delta = {"content": out.delta_text} if out.delta_text else {}
        yield chunk([{"index": index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": out.finish_reason if out.finished else None}])
    if body.stream_options is not None and body.stream_options.include_usage:
        yield chunk([], usage=generation.usage(body.n))


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


class TextOffsets:
    """Character offsets in the text of successive tokens: a character split over tokens is counted
    once, when its last byte arrives."""

    def __init__(self) -> None:
        self.offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # holds a split character

    def advance(self, token: bytes) -> int:
        """The offset where `token` starts; moves past it."""
        start = self.offset
        self.offset += len(self._decoder.decode(token))
        return start


def _completion_logprobs(logprobs: list[TokenLogprob] | None, tokenizer: Tokenizer,
                         offsets: TextOffsets) -> dict[str, Any]:
    """OpenAI's legacy shape; `top_logprobs` always holds the sampled token too (up to k + 1 entries)."""
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for entry in logprobs or []:
        text = _token_text(tokenizer, entry.token_id)
        tokens.append(text)
        token_logprobs.append(entry.logprob)
        alternatives = {_token_text(tokenizer, t): lp for t, lp in entry.top}
        alternatives.setdefault(text, entry.logprob)
        top.append(alternatives)
        text_offset.append(offsets.advance(tokenizer.token_bytes(entry.token_id)))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset}


def _echo(out: RequestOutput, prompt: str | list[int], with_logprobs: bool, tokenizer: Tokenizer,
          offsets: TextOffsets) -> tuple[str, dict[str, Any] | None]:
    """Completions' echo: the prompt's text (as sent, or its token ids decoded), and with logprobs the
    prompt tokens' entries in the legacy shape (the first token's logprob and top_logprobs null, as in
    OpenAI's and vLLM's answers); `offsets` moves past the prompt, so the output's offsets follow it."""
    if isinstance(prompt, str):
        text = prompt
    else:
        text = tokenizer.decode(list(prompt), skip_special_tokens=False)
    if not with_logprobs:
        offsets.offset += len(text)
        return text, None
    entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for index, (token_id, entry) in enumerate(zip(out.prompt_token_ids, entries, strict=True)):
        token_text = _token_text(tokenizer, token_id)
        tokens.append(token_text)
        # A BOS the tokenizer put before a text prompt is not in the echoed text: it takes no width.
        unseen = index == 0 and isinstance(prompt, str) and not text.startswith(token_text)
        text_offset.append(offsets.advance(b"" if unseen else tokenizer.token_bytes(token_id)))
        if entry is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(entry.logprob)
        alternatives = {_token_text(tokenizer, t): lp for t, lp in entry.top}
        alternatives.setdefault(token_text, entry.logprob)
        top.append(alternatives)
    return text, {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset}


def _chat_logprobs(logprobs: list[TokenLogprob] | None, tokenizer: Tokenizer) -> list[dict[str, Any]]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        # `bytes` are the token's own, so a character split over tokens can be put back together.
        return {"token": _token_text(tokenizer, token_id), "logprob": logprob,
                "bytes": list(tokenizer.token_bytes(token_id))}

    return [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
            for e in logprobs or []]
