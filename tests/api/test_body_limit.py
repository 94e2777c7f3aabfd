"""BodyLimit on its own: the size limit and the stall timeout apply while the body arrives, and not after
it (a streamed response waits on `receive` for the client's disconnect, however long it runs)."""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request

from loraplex.api.middleware import BodyLimit

SCOPE = {"type": "http", "path": "/v1/completions", "headers": [], "method": "POST"}


def run(messages: list[tuple[float, dict]], limit: int = 1000, timeout: float = 0.2):
    """Runs an app that reads the whole body, then waits for the disconnect, behind BodyLimit; the client
    sends `messages` (delay in seconds before each). Returns (what the app saw, what was sent)."""
    queue = list(messages)
    sent: list[dict] = []
    seen: dict = {}

    async def receive():
        delay, message = queue.pop(0)
        await asyncio.sleep(delay)
        return message

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        seen["body"] = await Request(scope, receive).body()
        seen["after"] = (await receive())["type"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        try:
            await BodyLimit(app, lambda path: limit, timeout)(SCOPE, receive, send)
        except Exception as error:  # noqa: BLE001 - the app's exception, as uvicorn would see it
            seen["raised"] = getattr(error, "status", type(error).__name__)

    asyncio.run(main())
    return seen, sent


def chunk(data: bytes, more: bool) -> dict:
    return {"type": "http.request", "body": data, "more_body": more}


def test_a_body_that_keeps_coming_is_read_whole():
    seen, sent = run([(0.1, chunk(b"a" * 10, True)), (0.15, chunk(b"b" * 10, True)), (0.15, chunk(b"c", False)),
                      (0.0, {"type": "http.disconnect"})])
    assert seen["body"] == b"a" * 10 + b"b" * 10 + b"c" and sent[0]["status"] == 200


def test_a_body_that_stalls_is_a_408_with_connection_close():
    seen, sent = run([(0.0, chunk(b"a" * 10, True)), (5.0, chunk(b"b", False))])
    assert seen == {"raised": 408}
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "body_timeout"
    assert len(sent) == 2  # the app's own error answer is dropped


def test_the_wait_after_the_whole_body_is_not_timed():
    seen, sent = run([(0.0, chunk(b"{}", False)), (0.6, {"type": "http.disconnect"})])
    assert seen == {"body": b"{}", "after": "http.disconnect"} and sent[0]["status"] == 200


def test_a_body_over_the_limit_is_a_413():
    seen, sent = run([(0.0, chunk(b"a" * 600, True)), (0.0, chunk(b"a" * 600, False))])
    assert seen == {"raised": 413} and sent[0]["status"] == 413
