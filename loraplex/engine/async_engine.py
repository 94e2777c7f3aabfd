"""AsyncEngine: the engine behind an asyncio server.

One background task steps the engine in a worker thread, so the event loop stays free to accept
requests and stream tokens. The engine itself is not thread-safe: requests are added and aborted
only between steps, under one lock that the stepping task releases after every step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from loraplex.adapters_store.formats import LoRAAdapter
from loraplex.engine.compositions import Recipe
from loraplex.engine.heap import HeapTrimmer
from loraplex.engine.llm_engine import LLMEngine, RequestOutput
from loraplex.engine.sampling import SamplingParams
from loraplex.errors import ErrorKind, LoraplexError, invalid
from loraplex.models.model_config import ModelConfig

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """A step failed: its requests are aborted; the engine goes on serving new ones."""


class QueueFullError(LoraplexError):
    """Admitting the requests would put more than `max_waiting` sequences in the waiting queue."""

    def __init__(self, waiting: int, max_waiting: int) -> None:
        super().__init__(None, f"the server is busy: {waiting} sequences are waiting (--max-waiting {max_waiting}); "
                         "retry shortly", ErrorKind.OVERLOADED, code="queue_full")
        self.waiting = waiting
        self.max_waiting = max_waiting


class RequestStream:
    """One request's outputs, in order; the last has `finished` set.

    It holds at most one unread output: when the reader lags behind the engine, a new output is merged
    into the unread one (their deltas joined, the newest totals kept), so a slow or stalled client costs
    one output's memory, not one per step.
    """

    def __init__(self, engine: AsyncEngine, request_id: str) -> None:
        self.engine = engine
        self.request_id = request_id
        self._pending: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        pending = self._pending
        if isinstance(pending, BaseException):
            return  # an error ends the stream; nothing after it matters
        if isinstance(item, RequestOutput) and isinstance(pending, RequestOutput):
            item = dataclasses.replace(item, delta_text=pending.delta_text + item.delta_text,
                                       delta_token_ids=pending.delta_token_ids + item.delta_token_ids)
        self._pending = item
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        await self._ready.wait()
        item, self._pending = self._pending, None
        self._ready.clear()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    async def aclose(self) -> None:
        """Abort the request unless it has finished (idempotent)."""
        if not self.finished:
            self.finished = True
            await self.engine.abort(self.request_id)


class CallerThreadExecutor(Executor):
    """Runs submitted calls on the thread that calls `run_until`: a server gives the engine its main
    thread this way. With torch's CPU threads, a step on the main thread runs about twice as fast on a
    2-core machine as the same step on any other thread, whose thread pool does not spin-wait."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def run_until(self, done: Callable[[], bool], poll_seconds: float = 0.1) -> None:
        """Run calls as they come until `done()` (checked at least every `poll_seconds`)."""
        while not done():
            try:
                future, fn, args, kwargs = self._calls.get(timeout=poll_seconds)
            except queue.Empty:
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:
                future.set_exception(e)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, step_executor: Executor | None = None) -> None:
        self.engine = engine
        self._lock = asyncio.Lock()
        self._has_work = asyncio.Event()
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._tokenizing = asyncio.Semaphore(2)  # long prompts tokenized at once, at most
        self._trim_heap = HeapTrimmer()  # when the engine goes idle: RSS back down after a burst
        self._building: dict[str, asyncio.Future] = {}  # composition name -> its build, shared by its requests
        # A text with more bytes than this can never fit, however it tokenizes.
        self._max_prompt_bytes = engine.max_model_len * engine.tokenizer.max_token_bytes
        # Every step on one thread (torch's CPU thread pool belongs to the thread that calls it): by
        # default a thread of its own; `loraplex serve` passes its main thread (CallerThreadExecutor).
        self._step_thread = step_executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loraplex-engine")

    async def shutdown(self) -> None:
        """Abort whatever is still running and stop the stepping task once its step is done (a step
        in the worker thread cannot be interrupted)."""
        for request_id in list(self._streams):
            await self.abort(request_id)
        if self._task is not None:
            self._stopping = True
            self._has_work.set()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    async def add_requests(
        self, requests: Sequence[tuple[str | list[int], SamplingParams]], adapter: str | None = None,
        request_ids: Sequence[str] | None = None, max_waiting: int | None = None,
    ) -> list[RequestStream]:
        """Queue several requests at once, all or none: LoraplexError for one that could never run,
        QueueFullError (of kind OVERLOADED) when more than `max_waiting` sequences would wait. Text is
        tokenized in a worker thread first, so long prompts hold neither the event loop nor the engine.
        Each stream must be read to its end or closed (`aclose`): closing early aborts the request,
        freeing its KV."""
        self.start()
        ids = list(request_ids) if request_ids is not None else [f"req-{next(self._ids)}" for _ in requests]
        if max_waiting is not None:  # before the costly part; checked again under the lock
            self._check_room(len(requests), max_waiting)
        prompts = await self._tokenize([prompt for prompt, _ in requests])
        async with self._lock:
            if max_waiting is not None:
                self._check_room(len(requests), max_waiting)
            added: list[str] = []
            try:
                for request_id, prompt, (_, params) in zip(ids, prompts, requests, strict=True):
                    self.engine.add_request(prompt, params, request_id, adapter=adapter)
                    added.append(request_id)
            except BaseException:
                for request_id in added:
                    self.engine.abort_request(request_id)
                raise
            streams = [RequestStream(self, request_id) for request_id in ids]
            self._streams.update((s.request_id, s) for s in streams)
        self._has_work.set()
        return streams

    def _check_room(self, count: int, max_waiting: int) -> None:
        waiting = len(self.engine.scheduler.waiting)
        if waiting + count > max_waiting:
            raise QueueFullError(waiting, max_waiting)

    async def _tokenize(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Token ids of every prompt (n choices of one text are encoded once), in a worker thread that
        lets go of the GIL, at most a few at a time; a text too long to ever fit is refused unread."""
        texts = list(dict.fromkeys(p for p in prompts if isinstance(p, str)))
        for text in texts:
            self.check_text_length(text)
        if not texts:
            return list(prompts)
        async with self._tokenizing:
            encoded = await asyncio.to_thread(self.engine.tokenizer.encode_many, texts)
        by_text = dict(zip(texts, encoded, strict=True))
        return [by_text[p] if isinstance(p, str) else p for p in prompts]

    async def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                          continue_final_message: bool = False, tools: list[dict] | None = None,
                          template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """The conversation through the model's chat template, tokenized, off the event loop. Raises
        what the template raises (it may refuse a conversation). A conversation whose text alone could
        never fit is refused before the template runs. `continue_final_message` (with
        add_generation_prompt false): the final message is left open, for the model to continue it.
        `template_kwargs`: extra variables for the template (a request's chat_template_kwargs)."""
        tokenizer = self.engine.tokenizer

        def render() -> list[int]:
            self.check_text_length("".join(m.get("content") or "" for m in messages), "messages")
            extra = dict(template_kwargs or {})
            if tools is not None:  # only a template that reads them gets them
                extra["tools"] = tools
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 continue_final_message=continue_final_message, **extra)
            self.check_text_length(text, "messages")
            return tokenizer.encode_many([text], add_special_tokens=False)[0]  # the template has the specials

        async with self._tokenizing:
            return await asyncio.to_thread(render)

    def check_text_length(self, text: str, field: str = "prompt") -> None:
        """LoraplexError on `field` for a text with more bytes than max_model_len of the longest tokens
        could hold."""
        limit = self._max_prompt_bytes
        if len(text) > limit or len(text.encode()) > limit:
            raise invalid(field, f"{len(text.encode())} bytes of text cannot fit in max_model_len "
                          f"({self.engine.max_model_len} tokens); shorten the {field}")

    async def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        adapter: str | None = None,
    ) -> RequestStream:
        """Queue one request; raises LoraplexError at once for one that could never run."""
        (stream,) = await self.add_requests([(prompt, params)], adapter, None if request_id is None else [request_id])
        return stream

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield this request's outputs as they come; the last has `finished` set. Closing the
        iterator early (a client went away) aborts the request and frees its KV blocks."""
        stream = await self.add_request(prompt, params, request_id, adapter)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    async def inspect_adapter(self, path: Path) -> LoRAAdapter:
        """Read and validate an adapter off the event loop; the engine keeps stepping meanwhile."""
        return await asyncio.to_thread(self.engine.inspect_adapter, path)

    async def add_adapter(self, name: str, path: Path, checksums: dict[str, str] | None = None,
                          preloaded: LoRAAdapter | None = None) -> None:
        """Register an adapter between steps: the next request naming it is served by it. Nothing is
        read under the lock: the weights come `preloaded` (from `inspect_adapter`) or at first use."""
        async with self._lock:
            self.engine.add_adapter(name, path, validate=False, checksums=checksums, preloaded=preloaded)

    async def remove_adapter(self, name: str) -> None:
        """Unregister between steps: requests already accepted on it finish, new ones are refused."""
        async with self._lock:
            self.engine.remove_adapter(name)

    async def compose(self, recipe: Recipe) -> str:
        """The name to run a composition under: registered already, or built now in a worker thread (once,
        however many requests ask for it at the same time) and registered between steps."""
        async with self._lock:
            name, build = self.engine.prepare_composition(recipe)
        if build is None:
            return name
        pending = self._building.get(name)
        if pending is None:
            pending = self._building[name] = asyncio.ensure_future(asyncio.to_thread(build))
            pending.add_done_callback(lambda _: self._building.pop(name, None))
        built = await asyncio.shield(pending)
        async with self._lock:
            self.engine.add_composition(name, recipe, build, built)
        return name

    async def adapter_path(self, name: str) -> Path:
        async with self._lock:
            return self.engine.adapter_path(name)

    @property
    def model_config(self) -> ModelConfig:
        return self.engine.model.config

    @property
    def max_lora_rank(self) -> int:
        return self.engine.config.max_lora_rank

    async def adapter_paths_in_use(self) -> set[Path]:
        async with self._lock:
            return self.engine.adapter_paths_in_use()

    async def abort(self, request_id: str) -> None:
        async with self._lock:
            self.engine.abort_request(request_id)
            self._streams.pop(request_id, None)

    async def _run(self) -> None:
        while True:
            await self._has_work.wait()
            if self._stopping:
                return
            async with self._lock:
                try:
                    outputs = await asyncio.get_running_loop().run_in_executor(self._step_thread, self.engine.step)
                except Exception as e:  # a failed step fails its requests, not the server
                    logger.exception("engine step failed; aborting %d request(s)", len(self._streams))
                    self._fail_all(e)
                    outputs = []
                idle = not self.engine.has_unfinished_requests() and not self._stopping
                if idle:
                    self._has_work.clear()  # (never a stop request's wake-up)
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
                    if out.finished:
                        del self._streams[out.request_id]
            if idle:  # after the outputs are handed out: the trim never delays them
                await asyncio.get_running_loop().run_in_executor(self._step_thread, self._trim_heap)

    def _fail_all(self, error: Exception) -> None:
        for request_id, stream in self._streams.items():
            self.engine.abort_request(request_id)
            stream.put(EngineStepError(f"engine step failed: {error}"))
        self._streams.clear()
