"""Executes a schedule against an OpenAI-compatible server: asyncio and one `httpx.AsyncClient`.

Open-loop arrivals (poisson, gamma) send each request at its time, whatever the server is doing; a closed
loop (concurrency) runs N clients that each send the next request of the schedule when their last one
ended. Either way sending stops at the duration (requests still running are awaited, each up to its
timeout) or when the schedule runs out. Each request is one `RequestRecord` (loadtest/metrics.py).

The client is bounded: at most `max_connections` connections (requests beyond them wait for one, which
shows in their TTFT), no redirects followed, no proxy from the environment (`trust_env=False`): requests
go to the address given and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from loadtest.metrics import RequestRecord
from loadtest.workload import Planned, synthetic_prompt


@dataclass(frozen=True)
class RequestOptions:
    model_names: tuple[str, ...]  # adapter index -> served name
    base_model: str | None  # for index -1
    endpoint: str = "completions"  # completions | chat
    stream: bool = True
    ignore_eos: bool = False
    temperature: float = 0.0
    seed: int = 0  # of the prompts' text

    def model_of(self, adapter: int) -> str:
        if adapter < 0:
            if self.base_model is None:
                raise ValueError("a request on the base model, but its name is not known")
            return self.base_model
        return self.model_names[adapter]

    def body(self, p: Planned) -> dict:
        text = synthetic_prompt(p.prompt_tokens, self.seed, p.index)
        body: dict = {"model": self.model_of(p.adapter), "max_tokens": p.output_tokens,
                      "temperature": self.temperature, "stream": self.stream}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body

    @property
    def path(self) -> str:
        return "/chat/completions" if self.endpoint == "chat" else "/completions"


class Progress:
    """Counts for the live progress line."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.sent = 0
        self.done = 0
        self.failed = 0
        self.output_tokens = 0


def _content_of(choice: dict, chat: bool) -> str:
    if chat:
        delta = choice.get("delta") or {}
        return delta.get("content") or ""
    return choice.get("text") or ""


class Runner:
    def __init__(self, client: httpx.AsyncClient, base_url: str, api_key: str | None, options: RequestOptions,
                 timeout: float) -> None:
        self.client = client
        self.url = base_url.rstrip("/") + options.path
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.options = options
        self.timeout = timeout
        self.t0 = 0.0

    async def one(self, p: Planned, progress: Progress) -> RequestRecord:
        rec = RequestRecord(p.index, self.options.model_of(p.adapter), p.time, p.prompt_tokens, p.output_tokens)
        rec.streamed = self.options.stream
        body = self.options.body(p)
        start = time.perf_counter()
        rec.start = start - self.t0
        progress.sent += 1
        try:
            await asyncio.wait_for(self._send(body, rec, start), self.timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            rec.error, rec.error_detail = "timeout", f"no complete answer within {self.timeout:g} s"
        except httpx.TransportError as e:
            rec.error, rec.error_detail = "connection", f"{type(e).__name__}: {e}"[:300]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            rec.error, rec.error_detail = "protocol", f"{type(e).__name__}: {e}"[:300]
        if rec.error is not None:
            rec.ok = False
            rec.e2e = time.perf_counter() - start if rec.e2e is None else rec.e2e
        progress.done += 1
        progress.failed += 0 if rec.ok else 1
        progress.output_tokens += rec.output_tokens if rec.ok else 0
        return rec

    async def _send(self, body: dict, rec: RequestRecord, start: float) -> None:
        chat = self.options.endpoint == "chat"
        async with self.client.stream("POST", self.url, json=body, headers=self.headers) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread())[:300].decode("utf-8", "replace")
                rec.e2e = time.perf_counter() - start
                rec.error, rec.error_detail = f"http_{resp.status_code}", detail
                return
            if not self.options.stream:
                data = json.loads(await resp.aread())
                rec.e2e = rec.ttft = time.perf_counter() - start
                choice = data["choices"][0]
                rec.finish_reason = choice.get("finish_reason")
                self._usage(rec, data.get("usage"))  # without usage its output tokens stay 0 (usage_missing)
                rec.ok = True
                return
            last, chunks = None, 0
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments, event: lines
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                if "error" in data and not data.get("choices"):
                    rec.e2e = time.perf_counter() - start
                    err = data["error"]
                    rec.error = "stream_error"
                    rec.error_detail = str(err.get("message") if isinstance(err, dict) else err)[:300]
                    return
                for choice in data.get("choices") or ():
                    if _content_of(choice, chat):
                        now = time.perf_counter()
                        if last is None:
                            rec.ttft = now - start
                        else:
                            rec.itl.append(now - last)
                        last = now
                        chunks += 1
                    if choice.get("finish_reason"):
                        rec.finish_reason = choice["finish_reason"]
                if data.get("usage"):
                    self._usage(rec, data["usage"])
            rec.e2e = time.perf_counter() - start
            if rec.ttft is None:
                rec.ttft = rec.e2e  # no content at all: the (empty) answer came at the end
            if not rec.usage_reported:
                rec.output_tokens = chunks
            rec.ok = True

    @staticmethod
    def _usage(rec: RequestRecord, usage: dict | None) -> None:
        if not usage:
            return
        rec.output_tokens = int(usage.get("completion_tokens") or 0)
        if usage.get("prompt_tokens") is not None:
            rec.prompt_tokens = int(usage["prompt_tokens"])
        rec.usage_reported = True


async def execute(runner: Runner, schedule: list[Planned], *, concurrency: int | None, duration: float | None,
                  on_progress: Callable[..., None] | None = None,
                  total: int | None = None) -> tuple[list[RequestRecord], float]:
    """Runs the schedule; returns its records (in schedule order, only the requests sent) and the elapsed
    seconds from the start to the end of the last request. `concurrency` None: open loop at the times.
    `total`: the count the progress line shows (None: unknown)."""
    progress = Progress(total)
    records: list[RequestRecord] = []
    t0 = runner.t0 = time.perf_counter()

    def over() -> bool:
        return duration is not None and time.perf_counter() - t0 >= duration

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            on_progress(progress, time.perf_counter() - t0)

    reporter = asyncio.create_task(report()) if on_progress else None
    try:
        if concurrency is None:
            tasks = []
            for p in schedule:
                delay = t0 + p.time - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if duration is not None and p.time > duration:
                    break
                tasks.append(asyncio.create_task(runner.one(p, progress)))
            records = list(await asyncio.gather(*tasks))
        else:
            queue = iter(schedule)
            done: list[RequestRecord] = []

            async def client() -> None:
                for p in queue:  # one shared iterator: each entry goes to one client
                    if over():
                        return
                    done.append(await runner.one(p, progress))

            await asyncio.gather(*(client() for _ in range(concurrency)))
            records = sorted(done, key=lambda r: r.index)
    finally:
        if reporter is not None:
            reporter.cancel()
    elapsed = max((r.end for r in records), default=time.perf_counter() - t0)
    if on_progress:
        on_progress(progress, time.perf_counter() - t0, final=True)
    return records, elapsed
