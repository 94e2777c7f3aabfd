"""The sequences one API request starts (prompts x n): submitted, streamed or collected, metered,
logged and aborted together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import anyio
from fastapi import Request

from loraplex.api.errors import APIError, from_error, model_not_found
from loraplex.api.metrics import SequenceTracker
from loraplex.api.state import ServerState
from loraplex.engine.async_engine import EngineStepError, QueueFullError, RequestStream
from loraplex.engine.llm_engine import RequestOutput
from loraplex.engine.sampling import SamplingParams
from loraplex.errors import ErrorKind, LoraplexError

request_log = logging.getLogger("loraplex.requests")

DISCONNECT_POLL_SECONDS = 0.25


class GenerationError(RuntimeError):
    """A sequence ended in error (its adapter failed to load, or a step failed), or the server stopped it."""

    def __init__(self, message: str, status: int = 500, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def stopped_by_server() -> GenerationError:
    """The error of a request whose task the server cancelled: its shutdown grace ran out (a client
    that leaves never cancels the task). Takes the cancellation back, so that the task may still answer."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):  # Python 3.11+ counts a task's cancellations
        task.uncancel()
    return GenerationError("the server is shutting down and stopped this request before it finished; retry it",
                           503, code="server_shutting_down")


class Generation:
    def __init__(self, state: ServerState, model: str, adapter: str | None, prefix: str, http_request_id: str) -> None:
        self.state = state
        self.model = model
        self.adapter = adapter
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.http_request_id = http_request_id
        self.created = int(time.time())
        self.streams: list[RequestStream] = []
        self.trackers: list[SequenceTracker] = []
        self.final: list[RequestOutput | None] = []
        self._pumps: list[asyncio.Task] = []
        self._start = time.perf_counter()

    async def submit(self, items: list[tuple[str | list[int], SamplingParams]]) -> None:
        """Queue every sequence, or none: a bad one raises 4xx with nothing left queued."""
        state = self.state
        ids = [f"{self.id}-{index}" for index in range(len(items))]
        try:
            self.streams = await state.engine.add_requests(items, self.adapter, ids, state.config.max_waiting)
        except QueueFullError as e:
            state.metrics.reject(self.adapter)
            raise from_error(e) from None
        except LoraplexError as e:
            if e.kind is ErrorKind.NOT_FOUND and e.field == "adapter":  # deleted a moment ago
                raise model_not_found(self.model) from None
            raise from_error(e) from None
        self.trackers = [state.metrics.track(self.adapter) for _ in self.streams]
        self.final = [None] * len(self.streams)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(sequence index, output) as the engine produces them, all sequences interleaved."""
        if len(self.streams) == 1:  # the common case: read the stream itself, no pump in between
            try:
                async for out in self.streams[0]:
                    yield 0, self._accept(0, out)
            except EngineStepError as e:
                self.trackers[0].finish("error")
                raise GenerationError(str(e)) from None
            return
        # Bounded: when the client reads slowly, pumps wait here and the engine's streams merge their
        # outputs meanwhile, so memory stays flat however far the engine runs ahead.
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue(len(self.streams))

        async def pump(index: int, stream: RequestStream) -> None:
            # No `finally`: a cancelled pump must not wait for room in the queue.
            try:
                async for out in stream:
                    await queue.put((index, out))
                end = None
            except EngineStepError as e:
                end = GenerationError(str(e))
            await queue.put((index, end))

        tasks = self._pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    self.trackers[index].finish("error")
                    raise item
                else:
                    yield index, self._accept(index, item)
        finally:
            await self._stop_pumps()

    def _accept(self, index: int, out: RequestOutput) -> RequestOutput:
        self.trackers[index].observe(out)
        if out.finished:
            self.final[index] = out
        if out.finish_reason == "error":
            if out.error is not None:  # the request's fault (an adapter that overflows): a 4xx by its kind
                mapped = from_error(out.error)
                raise GenerationError(mapped.message, mapped.status, mapped.code)
            raise GenerationError(f"generation failed: {out.stop_reason}")
        return out

    async def _stop_pumps(self) -> None:
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def collect(self, request: Request) -> list[RequestOutput]:
        """Every sequence's final output; aborts them all if the client goes away first."""

        async def drain() -> None:
            async for _ in self.outputs():
                pass

        task = asyncio.create_task(drain())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    raise APIError(499, "client disconnected")
            task.result()
        except asyncio.CancelledError:
            raise stopped_by_server() from None
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await self.close()
        return [out for out in self.final if out is not None]

    async def close(self) -> None:
        """Abort whatever has not finished (a client that left, an error); idempotent. Shielded: it
        runs to the end even when the request's task is being cancelled."""
        with anyio.CancelScope(shield=True):
            for stream, tracker in zip(self.streams, self.trackers, strict=True):
                if not stream.finished:
                    tracker.finish("abort")
                await stream.aclose()
            await self._stop_pumps()

    def usage(self, n: int) -> dict[str, int]:
        """Sequences are prompt-major (n choices per prompt); OpenAI counts each prompt once."""
        prompt_tokens = sum(len(out.prompt_token_ids) for out in self.final[::n] if out is not None)
        completion_tokens = sum(len(out.token_ids) for out in self.final if out is not None)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def log(self, endpoint: str, status: int) -> None:
        outcomes = [t.outcome or "abort" for t in self.trackers]
        ttfts = [t.ttft for t in self.trackers if t.ttft is not None]
        request_log.info(json.dumps({
            "event": "generation", "request_id": self.http_request_id, "id": self.id, "endpoint": endpoint,
            "model": self.model, "adapter": self.adapter, "status": status, "sequences": len(self.streams),
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in self.final if o is not None),
            "completion_tokens": sum(t.num_tokens for t in self.trackers), "outcomes": outcomes,
            "ttft_s": round(min(ttfts), 4) if ttfts else None,
            "latency_s": round(time.perf_counter() - self._start, 4),
        }))

