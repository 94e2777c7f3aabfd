"""ASGI middleware: a request id on every request and response, an access log line, CORS (Starlette's,
its refusals in OpenAI's error shape), and the body's limits: its size (checked on the declared length
and again on the bytes that actually arrive) and the time it may stall."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
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


class CORS(CORSMiddleware):
    """Starlette's CORSMiddleware, with a refused preflight (an origin, method or header not allowed)
    answered 400 in OpenAI's error shape and without any Access-Control-* header (Starlette's sends the
    allowed methods and headers along with its refusal): a page on another origin learns nothing."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        refused = response.body.decode("latin-1").removeprefix("Disallowed CORS ")  # e.g. "origin, headers"
        headers = {"Vary": response.headers["vary"]} if "vary" in response.headers else None
        message = f"CORS preflight refused: {refused} not allowed (the origins: --allowed-origins)"
        return JSONResponse(error_body(400, message, code="cors_preflight_refused"), status_code=400,
                            headers=headers)


class BodyLimit:
    """Refuses a body over the size limit for its path (413, without reading it when its declared length
    is too large) and a body that stalls: more than `timeout` seconds between two of its chunks (408).
    Either way the answer closes the connection. Once the whole body is in, `receive` passes through
    untimed (a streamed response waits on it for the client's disconnect)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int], timeout: float) -> None:
        self.app = app
        self.limit_for = limit_for
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_refusal(send, _too_large(limit))
            return
        received = 0
        body_done = started = refused = False

        async def refuse(error: APIError) -> APIError:
            nonlocal refused
            if not started:  # answer here: a JSON route would turn the error into a 400
                await _send_refusal(send, error)
                refused = True
            return error

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                raise await refuse(_stalled(self.timeout)) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise await refuse(_too_large(limit))
            else:
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the refusal went out already
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes; the limits are --max-body-size, and "
                    "--max-adapter-size for adapter uploads", code="body_too_large")


def _stalled(timeout: float) -> APIError:
    return APIError(408, f"the request body stalled: no data for {timeout:g} s (--body-timeout)",
                    code="body_timeout")


async def _send_refusal(send: Send, error: APIError) -> None:
    body = json.dumps(error_body(error.status, error.message, code=error.code)).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
