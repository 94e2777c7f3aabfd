"""The replica deployment: one engine with the whole single-server app (routes, auth, errors,
streaming, metrics), a mirror of the cluster's catalog, and Serve's model multiplexing keyed by the
request's `model` (an adapter's name, or the base model's), so that Serve routes a request to a replica
that served its adapter recently (whose host cache and slots likely hold it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from loraplex.config import ServerConfig
from loraplex.distributed.board import REPORT_SECONDS
from loraplex.distributed.forward import ForwardedRequest, ResponseStart, run_asgi
from loraplex.distributed.mirror import CatalogMirror

logger = logging.getLogger(__name__)


class LoraplexReplica:
    def __init__(self, engine_options: dict[str, Any], config: ServerConfig, catalog: Any, board: Any) -> None:
        from loraplex.api.server import build_app

        self.mirror = CatalogMirror(catalog)
        self.board = board
        self.work_dir = Path(tempfile.mkdtemp(prefix="loraplex-replica-"))  # the catalog's local copy
        try:
            self.app = build_app(engine_options, config, store_dir=self.work_dir / "store", publisher=self.mirror)
        except BaseException:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            raise
        self.state = self.app.state.loraplex
        self.mirror.registry = self.state.registry
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (tests of the class itself)
            self.replica_id = f"pid{os.getpid()}"
        self._lifespan: contextlib.AbstractAsyncContextManager | None = None
        self._start_lock = asyncio.Lock()
        self._reporter: asyncio.Task | None = None

    async def _start(self) -> None:
        if self._lifespan is not None:
            return
        async with self._start_lock:
            if self._lifespan is None:
                lifespan = self.app.router.lifespan_context(self.app)
                await lifespan.__aenter__()  # the engine's loop, the startup adapters
                self._lifespan = lifespan
                await self.mirror.sync()
                self._reporter = asyncio.create_task(self._report_metrics())

    async def _report_metrics(self) -> None:
        while True:
            try:
                await self.board.report.remote(self.replica_id, self.state.metrics.render().decode())
            except Exception:  # the board restarting: report again next time
                logger.debug("metrics report failed", exc_info=True)
            await asyncio.sleep(REPORT_SECONDS)

    async def __del__(self) -> None:
        """Serve awaits this when it stops the replica: its metrics leave the ingress's /metrics at once, the
        engine stops (the app's lifespan), and its copy of the catalog is removed."""
        if getattr(self, "_reporter", None) is not None:
            self._reporter.cancel()
        with contextlib.suppress(Exception):
            self.board.forget.remote(self.replica_id)
        if getattr(self, "_lifespan", None) is not None:
            with contextlib.suppress(Exception):
                await self._lifespan.__aexit__(None, None, None)
            self._lifespan = None
        shutil.rmtree(getattr(self, "work_dir", ""), ignore_errors=True)

    async def check_health(self) -> None:
        """Serve's health check (every 2 s): starts the app at the first one, so a new replica has its engine
        running, its catalog copy made and its metrics reported before its first request."""
        await self._start()

    async def base_name(self) -> str:
        """The base model's served name (the ingress spreads its requests instead of routing them by model)."""
        return self.state.base_name

    async def ready(self) -> str:
        await self._start()
        return self.replica_id

    async def load(self, model_id: str) -> str:
        """Serve's multiplexing loader: what it caches per replica is the name (which Serve reports to its
        routers); the engine's host cache and slots hold the weights (and evict them by their own policy),
        and `handle` syncs the catalog before every request."""
        return model_id

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        await self._start()
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.load(model_id)
        await self.mirror.sync()  # every request: a delete acknowledged anywhere is seen here first
        first = True
        async for item in run_asgi(self.app, request):
            if first and isinstance(item, ResponseStart):
                item = ResponseStart(item.status, [*item.headers, (b"x-loraplex-replica", self.replica_id.encode())])
                first = False
            yield item


def replica_deployment(max_models_per_replica: int) -> Any:
    """LoraplexReplica as a Serve deployment, its multiplexing cache sized like the host cache
    (--max-cpu-adapters, plus one for the base model)."""
    cls = type("LoraplexReplica", (LoraplexReplica,), {
        "load": serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(LoraplexReplica.load),
    })
    return serve.deployment(cls, name="LoraplexReplica")
