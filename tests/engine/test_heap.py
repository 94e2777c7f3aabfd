"""HeapTrimmer: malloc_trim(0) when the engine goes idle, at most once per interval; and the engine
loop really calls it when its work runs out."""

from __future__ import annotations

import asyncio
import ctypes.util
import sys

import pytest

from loraplex.engine.heap import HeapTrimmer
from loraplex.engine.sampling import SamplingParams


def test_it_trims_at_most_once_per_interval(monkeypatch):
    calls = []
    now = [100.0]
    monkeypatch.setattr("loraplex.engine.heap.time.monotonic", lambda: now[0])
    trimmer = HeapTrimmer(min_interval=1.0, trim=lambda pad: calls.append(pad) or 1)
    trimmer()
    trimmer()
    now[0] += 0.5
    trimmer()
    assert calls == [0]
    now[0] += 0.6
    trimmer()
    assert calls == [0, 0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux's")
def test_it_finds_glibcs_malloc_trim():
    assert ctypes.util.find_library("c") is not None
    assert HeapTrimmer()._trim is not None


def test_the_engine_trims_when_its_work_runs_out(demo_dir):
    from loraplex.engine.async_engine import AsyncEngine
    from loraplex.llm import LLM

    llm = LLM(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=128, kv_cache_memory="8MiB")
    engine = AsyncEngine(llm.engine)
    calls = []
    engine._trim_heap = HeapTrimmer(min_interval=0.0, trim=lambda pad: calls.append(pad) or 1)

    async def run():
        engine.start()
        async for out in engine.generate("Once upon", SamplingParams(max_tokens=3, temperature=0)):
            last = out
        await asyncio.sleep(0.2)
        await engine.shutdown()
        return last

    assert asyncio.run(run()).finished
    assert calls, "the engine went idle without trimming the heap"
