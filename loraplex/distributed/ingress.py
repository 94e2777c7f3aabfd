"""The cluster's ingress: one OpenAI endpoint in front of the replicas.

Every request but /metrics is carried to a replica whole (method, path, headers, body) and answered
there by the same app as `loraplex serve`'s, so routes, keys, errors and streaming are the single
server's. The request's `model` (read from a completion or chat body), unless it is the base model, is
Serve's multiplexed model id: the replicas' router (routing.py) sends it to that adapter's home replica.
A replica that dies before it answers is tried once more elsewhere; if that fails too, 503 with
Retry-After (never a hang). /metrics merges every replica's metrics under a `replica` label.
"""

# No `from __future__ import annotations`: FastAPI reads the route methods' annotations (Request) at
# import, through Serve's wrapper, and cannot resolve them as strings there.

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from loraplex.api.auth import Auth, required_role
from loraplex.api.errors import APIError, error_body
from loraplex.config import ServerConfig
from loraplex.distributed.forward import ForwardedRequest, ResponseStart
from loraplex.distributed.metrics import merge_replica_metrics

logger = logging.getLogger(__name__)

ROUTED_BY_MODEL = ("/v1/completions", "/v1/chat/completions")
MULTIPART_OVERHEAD = 1 << 20
RETRY_AFTER_SECONDS = "2"

app = FastAPI(title="loraplex (cluster)", docs_url=None, redoc_url=None, openapi_url=None)


def multiplexed_id(path: str, body: bytes) -> str:
    """The request's model for routing ("" where there is none: any replica)."""
    if path not in ROUTED_BY_MODEL or not body:
        return ""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return ""  # the replica answers the malformed body
    return model if isinstance(model, str) else ""


def _unavailable(message: str) -> JSONResponse:
    return JSONResponse(error_body(503, message, code="replica_unavailable"), status_code=503,
                        headers={"Retry-After": RETRY_AFTER_SECONDS})


async def _rest(stream: Any) -> AsyncIterator[bytes]:
    """The rest of a streamed answer (server-sent events). A replica that fails mid-stream ends it with an
    error event and [DONE], as one server does when it stops mid-stream. Closed early (the client went
    away), it cancels the replica's request, which aborts its sequences there as on one server."""
    try:
        async for chunk in stream:
            yield chunk
    except Exception as e:
        logger.warning("replica failed mid-response: %s", e)
        error = error_body(503, "the replica serving this stream failed; retry the request",
                           code="replica_unavailable")
        yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
    finally:
        stream.cancel()


@serve.deployment(name="LoraplexIngress")
@serve.ingress(app)
class Ingress:
    def __init__(self, replicas: Any, board: Any, config: ServerConfig, routing: str = "affinity") -> None:
        self.replicas = replicas
        self.board = board
        self.config = config
        self.auth = Auth(config.api_key, config.admin_key)
        self.by_model = routing != "random"  # random: Serve's default choice, blind to adapters
        self.base: str | None = None  # the base model's name, asked of a replica once: its requests are spread

    @app.get("/metrics")
    async def metrics(self) -> Response:
        texts = await self.board.texts.remote()
        return Response(merge_replica_metrics(texts), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"])
    async def forward(self, request: Request, path: str) -> Response:
        # The keys first, before any body is read (as one server's AuthGate); the replica checks them again.
        role = required_role(request.method, request.url.path)
        if role is not None:
            try:
                self.auth.check(role, request.headers.get("authorization", ""))
            except APIError as e:
                return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status,
                                    headers=e.headers)
        limit = (self.config.max_adapter_bytes + MULTIPART_OVERHEAD if request.url.path == "/v1/adapters"
                 else self.config.max_body_bytes)
        body = bytearray()
        chunks = request.stream().__aiter__()
        while True:
            try:  # a body must keep arriving (--body-timeout between chunks), as on one server
                chunk = await asyncio.wait_for(chunks.__anext__(), self.config.body_timeout)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                return JSONResponse(error_body(408, f"the request body stalled for {self.config.body_timeout} s; "
                                                    "send it without pauses", code="body_timeout"),
                                    status_code=408, headers={"Connection": "close"})
            body += chunk
            if len(body) > limit:
                return JSONResponse(error_body(413, f"the request body is over {limit} bytes", code="too_large"),
                                    status_code=413)
        client = (request.client.host, request.client.port) if request.client else None
        forwarded = ForwardedRequest(request.method, request.url.path, request.url.query.encode(),
                                     [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()],
                                     bytes(body), client)
        model_id = multiplexed_id(request.url.path, forwarded.body) if self.by_model else ""
        if model_id:
            if self.base is None:
                try:
                    self.base = await self.replicas.base_name.remote()
                except Exception:  # no replica up yet: route by the name this once
                    logger.warning("could not ask a replica for the base model's name", exc_info=True)
            if model_id == self.base:
                model_id = ""  # every replica serves the base model: the less loaded of two takes it
        for attempt in range(2):
            stream = self.replicas.options(multiplexed_model_id=model_id, stream=True).handle.remote(forwarded)
            try:
                first = await stream.__anext__()
            except BackPressureError:
                return JSONResponse(error_body(429, "every replica is at its limit of requests in flight and the "
                                                    "queue is full; retry in a moment", code="overloaded"),
                                    status_code=429, headers={"Retry-After": RETRY_AFTER_SECONDS})
            except (RayActorError, ActorUnavailableError) as e:  # died or was replaced before it began
                logger.warning("replica unavailable before answering (attempt %d): %s", attempt + 1, e)
                continue
            except StopAsyncIteration:
                return _unavailable("the replica ended the request without an answer; retry")
            except Exception as e:  # the replica failed in another way: not retried (it may have acted)
                logger.error("replica failed before answering: %s", e)
                return JSONResponse(error_body(502, f"the replica failed: {type(e).__name__}", code="replica_error"),
                                    status_code=502)
            if not isinstance(first, ResponseStart):
                return _unavailable("the replica's answer began without a status; retry")
            # Serve's proxy sets its own x-request-id (the client's, when given, as the replica's is)
            headers = [(k, v) for k, v in first.headers if k.lower() != b"x-request-id"]
            if dict(headers).get(b"content-type", b"").startswith(b"text/event-stream"):
                response: Response = StreamingResponse(_rest(stream), status_code=first.status)
            else:  # a whole answer: read it all, then one message to the client
                try:
                    content = b"".join([chunk async for chunk in stream])
                except Exception as e:
                    logger.warning("replica failed mid-answer: %s", e)
                    return _unavailable("the replica failed while answering; retry")
                finally:
                    stream.cancel()  # (a no-op once done; stops the replica's work if this request was cancelled)
                response = Response(content, status_code=first.status)
            response.raw_headers = headers
            return response
        return _unavailable("no replica could take the request (one is restarting); retry in a moment")

