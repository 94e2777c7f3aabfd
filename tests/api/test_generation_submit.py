"""Generation.submit: what the engine refuses becomes one HTTP error, chosen by the error's kind and
field (no live server: a stand-in engine raises what the real one raises)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from loraplex.api.errors import APIError
from loraplex.api.generation import Generation
from loraplex.config import ServerConfig
from loraplex.engine.async_engine import QueueFullError
from loraplex.engine.sampling import SamplingParams
from loraplex.errors import invalid, not_found


class RefusingEngine:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def add_requests(self, items, adapter, ids, max_waiting):
        raise self.error


class Metrics:
    def __init__(self) -> None:
        self.rejected: list[str | None] = []

    def reject(self, adapter: str | None) -> None:
        self.rejected.append(adapter)


def submit(error: Exception, adapter: str | None = "support-v3") -> tuple[APIError, Metrics]:
    metrics = Metrics()
    state = SimpleNamespace(engine=RefusingEngine(error), metrics=metrics, config=ServerConfig())
    generation = Generation(state, model=adapter or "base", adapter=adapter, prefix="cmpl", http_request_id="r1")
    with pytest.raises(APIError) as info:
        asyncio.run(generation.submit([("hello", SamplingParams())]))
    return info.value, metrics


def test_an_adapter_deleted_a_moment_ago_is_the_models_404():
    error, _ = submit(not_found("adapter", "'support-v3' is not registered (registered: none)"))
    assert (error.status, error.param, error.code) == (404, "model", "model_not_found")
    assert "support-v3" in error.message


def test_an_invalid_request_is_a_400_on_its_field():
    error, metrics = submit(invalid("max_tokens", "prompt (9 tokens) + max_tokens (600) = 609 exceeds max_model_len"))
    assert (error.status, error.param) == (400, "max_tokens") and error.message.startswith("max_tokens: ")
    assert metrics.rejected == []


def test_a_full_queue_is_a_429_counted_as_rejected():
    error, metrics = submit(QueueFullError(waiting=10, max_waiting=10))
    assert (error.status, error.code, error.headers) == (429, "queue_full", {"Retry-After": "1"})
    assert metrics.rejected == ["support-v3"]


def test_a_sequence_ended_by_its_adapters_overflow_is_a_400_not_a_500():
    from loraplex.api.generation import GenerationError
    from loraplex.engine.output import RequestOutput

    generation = Generation(SimpleNamespace(), model="poison", adapter="poison", prefix="cmpl", http_request_id="r1")
    generation.trackers, generation.final = [SimpleNamespace(observe=lambda out: None)], [None]
    error = invalid("model", "adapter 'poison' produced non-finite values", code="non_finite_output")
    out = RequestOutput("r", None, [1], "", [], "", [], None, True, "error", str(error), error=error)
    with pytest.raises(GenerationError) as info:
        generation._accept(0, out)
    assert (info.value.status, info.value.code) == (400, "non_finite_output")
    assert str(info.value).startswith("model: ")
