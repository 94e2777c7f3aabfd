"""AsyncEngine: the engine behind an asyncio server.

One background task steps the engine in a worker thread, so the event loop stays free to accept
requests and stream tokens. The engine itself is not thread-safe: requests are added and aborted
only between steps, under one lock that the stepping task releases after every step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from loraplex.adapters_store.formats import LoRAAdapter
from loraplex.engine.llm_engine import LLMEngine, RequestOutput
from loraplex.engine.sampling import SamplingParams

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """A step failed: its requests are aborted; the engine goes on serving new ones."""


class RequestStream:
    """One request's outputs, in order; the last has `finished` set."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue) -> None:
        self.engine = engine
        self.request_id = request_id
        self._queue = queue
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
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


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = asyncio.Lock()
        self._has_work = asyncio.Event()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._ids = itertools.count()
        self._task: asyncio.Task | None = None
        self._stopping = False

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

    async def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        adapter: str | None = None,
    ) -> RequestStream:
        """Queue a request; raises ValueError at once for one that could never run. The stream must
        be read to its end or closed (`aclose`): closing early aborts the request and frees its KV."""
        self.start()
        request_id = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        async with self._lock:
            self.engine.add_request(prompt, params, request_id, adapter=adapter)
            self._streams[request_id] = queue
        self._has_work.set()
        return RequestStream(self, request_id, queue)

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

    async def add_adapter(self, name: str, path: Path, validate: bool = True,
                          checksums: dict[str, str] | None = None) -> LoRAAdapter | None:
        """Register an adapter between steps: the next request naming it is served by it."""
        async with self._lock:
            return await asyncio.to_thread(self.engine.add_adapter, name, path, validate, checksums)

    async def remove_adapter(self, name: str) -> None:
        """Unregister between steps: requests running on it finish, new ones are refused."""
        async with self._lock:
            self.engine.remove_adapter(name)

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
                    outputs = await asyncio.to_thread(self.engine.step)
                except Exception as e:  # a failed step fails its requests, not the server
                    logger.exception("engine step failed; aborting %d request(s)", len(self._streams))
                    self._fail_all(e)
                    outputs = []
                if not self.engine.has_unfinished_requests() and not self._stopping:
                    self._has_work.clear()  # (never a stop request's wake-up)
            for out in outputs:
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
                    if out.finished:
                        del self._streams[out.request_id]

    def _fail_all(self, error: Exception) -> None:
        for request_id, queue in self._streams.items():
            self.engine.abort_request(request_id)
            queue.put_nowait(EngineStepError(f"engine step failed: {error}"))
        self._streams.clear()
