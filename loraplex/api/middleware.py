"""ASGI middleware: a request id on every request and response, an access log line, and the body
size limit (checked on the declared length and again on the bytes that actually arrive)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.api.errors import APIError, error_body

access_log = logging.getLogger("loraplex.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestContext:
    """Takes the client's `X-Request-Id` (when it is a safe token) or makes one, returns it as a
    response header and logs one JSON line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_log.info(json.dumps({
                "event": "http", "request_id": request_id, "method": scope["method"], "path": scope["path"],
                "status": status, "duration_s": round(time.perf_counter() - start, 4),
                "client": (scope.get("client") or ("", 0))[0],
            }))


class BodyLimit:
    """Refuses bodies over the limit for their path with 413, without reading them."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_413(send, limit)
            return
        received = 0
        started = refused = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not started:  # answer 413 here: a JSON route would turn the error into a 400
                        await _send_413(send, limit)
                        refused = True
                    raise _too_large(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out already
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes; the limits are --max-body-size, and "
                    "--max-adapter-size for adapter uploads", code="body_too_large")


async def _send_413(send: Send, limit: int) -> None:
    error = _too_large(limit)
    body = json.dumps(error_body(413, error.message, code=error.code)).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
