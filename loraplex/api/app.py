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
from loraplex.api.middleware import BodyLimit, RequestContext
from loraplex.api.state import ServerState, State

logger = logging.getLogger(__name__)

UPLOAD_PATHS = ("/v1/adapters",)
MULTIPART_OVERHEAD = 1 << 20  # part headers and boundaries around the adapter's bytes


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

    max_body, max_upload = state.config.max_body_bytes, state.config.max_adapter_bytes + MULTIPART_OVERHEAD
    # Outermost last: request id and log, then keys, then the body limit, then the routes.
    app.add_middleware(BodyLimit, limit_for=lambda path: max_upload if path in UPLOAD_PATHS else max_body,
                       timeout=state.config.body_timeout)
    app.add_middleware(AuthGate, auth=state.auth)
    app.add_middleware(RequestContext)
    return app
