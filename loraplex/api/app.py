"""The FastAPI application: routes, error shapes, middleware, and the engine's lifetime."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from loraplex.api import adapters, openai
from loraplex.api.auth import AuthGate
from loraplex.api.errors import install_handlers
from loraplex.api.metrics import adapters_in_queues
from loraplex.api.middleware import CORS, BodyLimit, RequestContext
from loraplex.api.state import ServerState, State

logger = logging.getLogger(__name__)

UPLOAD_PATHS = ("/v1/adapters",)
MULTIPART_OVERHEAD = 1 << 20  # part headers and boundaries around the adapter's bytes

# CORS (--allowed-origins): what a browser page on an allowed origin may send and read.
CORS_METHODS = ("GET", "POST", "DELETE", "OPTIONS")
CORS_HEADERS = (
    "Authorization", "Content-Type", "X-Request-Id",
    # sent by the OpenAI JS/TS SDK (Stainless) on every request: without them its preflight fails
    "X-Stainless-Arch", "X-Stainless-Lang", "X-Stainless-OS", "X-Stainless-Package-Version",
    "X-Stainless-Retry-Count", "X-Stainless-Runtime", "X-Stainless-Runtime-Version", "X-Stainless-Timeout",
    "X-Stainless-Helper-Method", "X-Stainless-Async",
)
CORS_EXPOSED = ("X-Request-Id", "Retry-After")


def create_app(state: ServerState, startup_adapters: dict[str, tuple[Path, str]] | None = None) -> FastAPI:
    """`startup_adapters`: {name: (directory, source)} served for this run only (`--adapter`, the demo's),
    registered after the stored ones, so they win a name clash."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        await state.registry.restore()
        for name, (path, source) in (startup_adapters or {}).items():
            if name in state.registry:
                logger.warning("adapter %s: --adapter %s replaces the stored adapter of that name for this run",
                               name, path)
            await state.registry.add_local(name, path, source)
        names = sorted(state.registry.infos)
        logger.info("serving %s with %d adapter(s)%s", state.base_name, len(names),
                    f": {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}" if names else "")
        yield
        logger.info("stopping: aborting %d unfinished request(s)", state.engine.num_requests)
        await state.engine.shutdown()
        if state.engine.engine.adapters is not None:
            state.engine.engine.adapters.shutdown()
        state.registry.store.close()

    app = FastAPI(title="loraplex", summary="OpenAI-compatible multi-adapter LLM server", lifespan=lifespan)
    app.state.loraplex = state
    install_handlers(app)
    app.include_router(openai.router)
    app.include_router(adapters.router)

    @app.get("/health")
    async def health(state: State) -> dict[str, object]:
        stats = state.engine.engine.stats()
        return {"status": "ok", "model": state.base_name, "adapters": len(state.registry.infos),
                "running": stats.num_running, "waiting": stats.num_waiting}

    @app.get("/metrics")
    async def metrics(state: State) -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    engine = state.engine.engine
    state.metrics.export_vllm_names(
        state.base_name, engine.config.max_loras,
        (lambda: adapters_in_queues(engine.scheduler)) if engine.adapters is not None else None)

    max_body, max_upload = state.config.max_body_bytes, state.config.max_adapter_bytes + MULTIPART_OVERHEAD
    # Each add_middleware wraps what was added before, so the last added is the outermost: request id and
    # log, then CORS, then keys, then the body limit, then the routes. CORS is outside the keys: a browser
    # sends its preflight (OPTIONS) without credentials, so it is answered before the key check, and a
    # 401/403 (or 413/408) to a page on an allowed origin still carries Access-Control-Allow-Origin, so the
    # page can read the error.
    app.add_middleware(BodyLimit, limit_for=lambda path: max_upload if path in UPLOAD_PATHS else max_body,
                       timeout=state.config.body_timeout)
    app.add_middleware(AuthGate, auth=state.auth)
    if state.config.allowed_origins:  # none: no CORS layer at all (no CORS headers, OPTIONS as any method)
        app.add_middleware(CORS, allow_origins=list(state.config.allowed_origins),
                           allow_methods=list(CORS_METHODS), allow_headers=list(CORS_HEADERS),
                           expose_headers=list(CORS_EXPOSED))
    app.add_middleware(RequestContext)
    return app
