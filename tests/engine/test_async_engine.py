"""AsyncEngine: concurrent streams, cancellation frees the sequence, bad requests raise at once."""

import asyncio
import threading

import pytest

from loraplex import SamplingParams
from loraplex.engine.async_engine import AsyncEngine, CallerThreadExecutor, QueueFullError
from loraplex.errors import ErrorKind, LoraplexError


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
            with pytest.raises(LoraplexError, match="max_model_len") as info:
                async for _ in engine.generate([5] * 600, SamplingParams(max_tokens=5)):
                    pass
            assert info.value.field == "max_tokens" and info.value.kind is ErrorKind.INVALID
            with pytest.raises(LoraplexError, match="^prompt: .* bytes of text cannot fit in max_model_len") as info:
                await engine.add_request("x" * 10**6, SamplingParams(max_tokens=5))
            assert info.value.field == "prompt" and info.value.kind is ErrorKind.INVALID
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_a_reader_that_lags_holds_one_merged_output(demo_llm):
    """The engine runs ahead of a client that does not read: the stream keeps one unread output,
    whose deltas add up to everything generated meanwhile."""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = demo_llm.generate("Once upon a time", params)[0]

    async def run():
        engine = AsyncEngine(demo_llm.engine)
        stream = await engine.add_request("Once upon a time", params)
        while demo_llm.engine.has_unfinished_requests():
            await asyncio.sleep(0.01)
        pending = stream._pending  # one output, however many steps ran
        outputs = [out async for out in stream]
        await engine.shutdown()
        return pending, outputs

    pending, outputs = asyncio.run(run())
    assert len(outputs) == 1 and outputs[0] is pending and pending.finished
    assert pending.delta_text == expected.text and pending.delta_token_ids == expected.token_ids
    assert pending.token_ids == expected.token_ids


def test_add_requests_is_all_or_nothing(demo_llm):
    good = SamplingParams(max_tokens=4)

    async def run():
        engine = AsyncEngine(demo_llm.engine)
        try:
            with pytest.raises(ValueError, match="max_model_len"):
                await engine.add_requests([("Hello", good), ([5] * 600, good), ("Hi", good)])
            assert not demo_llm.engine.has_unfinished_requests(), "the first request stayed queued"
            with pytest.raises(QueueFullError) as info:
                await engine.add_requests([("a", good)] * 3, max_waiting=2)
            assert info.value.max_waiting == 2 and not demo_llm.engine.has_unfinished_requests()
            assert info.value.kind is ErrorKind.OVERLOADED and info.value.code == "queue_full"
            streams = await engine.add_requests([("a", good)] * 2, max_waiting=2)
            for stream in streams:
                outputs = [out async for out in stream]
                assert len(outputs[-1].token_ids) == 4
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_the_sequences_of_one_request_share_its_stop_ids(demo_llm):
    params = SamplingParams(max_tokens=2, seed=1, stop_token_ids=list(range(1000)))

    async def run():
        engine = AsyncEngine(demo_llm.engine)
        try:
            streams = await engine.add_requests([("a", params.for_choice(j)) for j in range(8)])
            sequences = [demo_llm.engine._requests[s.request_id].seq for s in streams]
            assert all(seq.stop_token_ids is sequences[0].stop_token_ids for seq in sequences)
            assert sequences[0].stop_token_ids >= set(range(1000))
            for stream in streams:
                await stream.aclose()
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_caller_thread_executor_runs_calls_on_the_thread_that_drains_it():
    executor = CallerThreadExecutor()
    ran_on: list[str] = []
    results: dict[str, object] = {}

    def client() -> None:
        ok = executor.submit(lambda: ran_on.append(threading.current_thread().name) or 42)
        bad = executor.submit(lambda: 1 / 0)
        skipped = executor.submit(lambda: ran_on.append("cancelled call ran"))
        skipped.cancel()
        results["ok"] = ok.result(timeout=10)
        results["bad"] = bad.exception(timeout=10)

    thread = threading.Thread(target=client)
    thread.start()
    executor.run_until(lambda: not thread.is_alive(), poll_seconds=0.01)
    assert ran_on == [threading.current_thread().name]
    assert results["ok"] == 42 and isinstance(results["bad"], ZeroDivisionError)


def test_steps_run_on_the_given_executor(demo_llm):
    """`loraplex serve` hands the engine its main thread; the steps must run there."""
    executor = CallerThreadExecutor()
    step_threads: set[str] = set()
    real_step = demo_llm.engine.step

    def step(*args, **kwargs):
        step_threads.add(threading.current_thread().name)
        return real_step(*args, **kwargs)

    async def run():
        engine = AsyncEngine(demo_llm.engine, step_executor=executor)
        outputs = [out async for out in engine.generate("Hello", SamplingParams(max_tokens=5, ignore_eos=True))]
        await engine.shutdown()
        return outputs

    demo_llm.engine.step = step
    try:
        result: list = []
        loop_thread = threading.Thread(target=lambda: result.append(asyncio.run(run())), name="event-loop")
        loop_thread.start()
        executor.run_until(lambda: not loop_thread.is_alive(), poll_seconds=0.01)
    finally:
        del demo_llm.engine.step
    assert step_threads == {threading.current_thread().name}
    assert len(result[0][-1].token_ids) == 5
