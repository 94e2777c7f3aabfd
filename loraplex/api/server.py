"""`loraplex serve`: build the engine, the store and the app, and run them under uvicorn."""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import uvicorn

from loraplex.adapters_store.store import AdapterStore
from loraplex.api.app import create_app
from loraplex.api.auth import Auth
from loraplex.api.metrics import Metrics
from loraplex.api.registry import AdapterRegistry
from loraplex.api.state import ServerState
from loraplex.config import EngineConfig, ServerConfig
from loraplex.engine.async_engine import AsyncEngine, CallerThreadExecutor
from loraplex.engine.llm_engine import LLMEngine
from loraplex.llm import resolve_model

logger = logging.getLogger(__name__)


def build_app(engine_options: dict[str, Any], config: ServerConfig, step_executor: Executor | None = None):
    """The app, with the model loaded: everything but the listening socket. Engine steps run on
    `step_executor` (default: a thread of their own)."""
    options = dict(engine_options)
    cli_adapters = options.pop("adapters", None) or {}
    engine_config = EngineConfig.from_options(**options)
    resolved = resolve_model(engine_config)
    engine = LLMEngine(engine_config, resolved.path)
    if cli_adapters and engine.adapters is None:
        raise ValueError("--adapter: given, but --max-loras is 0; allow at least one adapter slot")
    store_dir = engine_config.resolved_data_dir() / "adapters" / _slug(resolved.served_name)
    async_engine = AsyncEngine(engine, step_executor)
    state = ServerState(
        engine=async_engine,
        registry=AdapterRegistry(async_engine, AdapterStore(store_dir, exclusive=True), resolved.served_name),
        metrics=_metrics(engine, config),
        auth=Auth(config.api_key, config.admin_key),
        config=config,
        base_name=resolved.served_name,
        created=int(time.time()),
    )
    startup = {name: (Path(path), "demo") for name, path in resolved.adapters.items()} if engine.adapters else {}
    startup.update({name: (Path(path), "cli") for name, path in cli_adapters.items()})
    logger.info("adapter store: %s", store_dir)
    if config.api_key is not None and config.admin_key is None:
        logger.warning("--api-key without --admin-key: every API key holder may upload and delete adapters")
    return create_app(state, startup)


def _metrics(engine: LLMEngine, config: ServerConfig) -> Metrics:
    drain = engine.adapters.drain_load_seconds if engine.adapters is not None else list
    return Metrics(engine.stats, drain, config.metrics_max_adapters)


def _slug(name: str) -> str:
    # The store is kept per base model: adapters are only valid for the model they were made for.
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "model"


class Server(uvicorn.Server):
    """uvicorn's server, saying where to point a client."""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                logger.info("ready: point an OpenAI client at base_url=http://%s:%d/v1", host, port)


def make_server(app, config: ServerConfig) -> Server:
    return Server(uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False,
                                 timeout_graceful_shutdown=config.shutdown_grace, lifespan="on"))


def serve(engine_options: dict[str, Any], config: ServerConfig) -> int:
    """HTTP on a thread of its own, engine steps on the main thread (where torch's CPU threads are
    fastest). Ctrl-C / SIGTERM start uvicorn's graceful stop; the process then exits 0 (uvicorn, on
    the main thread, would re-raise the signal and end with 143)."""
    steps = CallerThreadExecutor()
    server = make_server(build_app(engine_options, config, steps), config)
    http = threading.Thread(target=server.run, name="http", daemon=True)
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        steps.run_until(lambda: not http.is_alive())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1
