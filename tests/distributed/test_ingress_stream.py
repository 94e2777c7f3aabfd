"""The ingress's pieces that need no cluster: the routing id it reads from a body, and a stream whose
replica fails midway ending with an error event and [DONE] (as one server's stream does when it stops),
the replica's request cancelled whichever way the stream ends."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install -e '.[ray]')")

from loraplex.distributed.ingress import _rest, multiplexed_id  # noqa: E402


class Stream:
    def __init__(self, chunks: list[bytes], fail: bool) -> None:
        self.chunks, self.fail, self.cancelled = chunks, fail, False

    def __aiter__(self):
        return self._items()

    async def _items(self):
        for chunk in self.chunks:
            yield chunk
        if self.fail:
            raise RuntimeError("the replica died")

    def cancel(self) -> None:
        self.cancelled = True


def collect(stream: Stream) -> list[bytes]:
    async def run() -> list[bytes]:
        return [chunk async for chunk in _rest(stream)]

    return asyncio.run(run())


def test_a_replica_failing_mid_stream_ends_it_with_an_error_event_and_done():
    stream = Stream([b'data: {"choices": []}\n\n'], fail=True)
    chunks = collect(stream)
    assert chunks[0] == b'data: {"choices": []}\n\n'
    events = [e for e in b"".join(chunks[1:]).decode().split("\n\n") if e]
    assert json.loads(events[0].removeprefix("data: "))["error"]["code"] == "replica_unavailable"
    assert events[-1] == "data: [DONE]" and stream.cancelled


def test_a_whole_stream_passes_through_unchanged_and_is_released():
    stream = Stream([b"data: 1\n\n", b"data: [DONE]\n\n"], fail=False)
    assert collect(stream) == [b"data: 1\n\n", b"data: [DONE]\n\n"] and stream.cancelled


@pytest.mark.parametrize(("path", "body", "expected"), [
    ("/v1/completions", b'{"model": "alpha", "prompt": "x"}', "alpha"),
    ("/v1/chat/completions", b'{"model": "a*0.5+b*0.5", "messages": []}', "a*0.5+b*0.5"),
    ("/v1/completions", b"not json", ""),
    ("/v1/completions", b'["a list"]', ""),
    ("/v1/completions", b'{"model": 7}', ""),
    ("/v1/adapters", b'{"model": "alpha"}', ""),
])
def test_the_routing_id_is_the_bodys_model_on_generation_routes_only(path, body, expected):
    assert multiplexed_id(path, body) == expected
