"""AsyncEngine: concurrent streams, cancellation frees the sequence, bad requests raise at once."""

import asyncio

import pytest

from loraplex import SamplingParams
from loraplex.engine.async_engine import AsyncEngine


def test_concurrent_streams_match_offline_results(demo_llm):
    prompts = ["Once upon a time", "def add(a, b):", "The lighthouse keeper"]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in demo_llm.generate(prompts, params)]

    async def collect(engine: AsyncEngine, prompt: str):
        chunks, last = [], None
        async for out in engine.generate(prompt, params):
            chunks.append(out.delta_text)
            last = out
        return last, "".join(chunks)

    async def run():
        engine = AsyncEngine(demo_llm.engine)
        results = await asyncio.gather(*(collect(engine, p) for p in prompts))
        await engine.shutdown()
        return results

    results = asyncio.run(run())
    for (last, streamed), tokens in zip(results, expected, strict=True):
        assert last.finished and last.token_ids == tokens
        assert streamed == last.text


def test_closing_a_stream_aborts_and_frees_blocks(demo_llm):
    engine_ = demo_llm.engine
    bm = engine_.block_manager

    async def run():
        engine = AsyncEngine(engine_)
        stream = engine.generate("A long story", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()  # what a server does when its client disconnects
        await engine.shutdown()
        return seen

    assert asyncio.run(run()) == 3
    assert not engine_.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks


def test_bad_request_raises_before_streaming(demo_llm):
    async def run():
        engine = AsyncEngine(demo_llm.engine)
        try:
            with pytest.raises(ValueError, match="max_model_len"):
                async for _ in engine.generate([5] * 600, SamplingParams(max_tokens=5)):
                    pass
        finally:
            await engine.shutdown()

    asyncio.run(run())
