"""`loraplex serve`: build the engine, the store and the app, and run them under uvicorn."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
import signal
import threading
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools missing: uvicorn's h11 protocol serves instead
    HttpToolsProtocol = None

from loraplex.adapters_store.store import AdapterStore
from loraplex.api.app import create_app
from loraplex.api.auth import Auth
from loraplex.api.errors import error_body
from loraplex.api.metrics import Metrics
from loraplex.api.registry import AdapterRegistry, Publisher
from loraplex.api.state import ServerState
from loraplex.cache import STORES_DIRNAME
from loraplex.config import EngineConfig, ServerConfig
from loraplex.engine.async_engine import AsyncEngine, CallerThreadExecutor
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.threads import serving_threads
from loraplex.llm import resolve_model
from loraplex.preflight import store_slug

logger = logging.getLogger(__name__)


def build_app(engine_options: dict[str, Any], config: ServerConfig, step_executor: Executor | None = None,
              store_dir: Path | None = None, publisher: Publisher | None = None):
    """The app, with the model loaded: everything but the listening socket. Engine steps run on
    `step_executor` (default: a thread of their own). A cluster's replica passes its own `store_dir` (a
    mirror of the catalog) and the `publisher` its changes go to (loraplex/distributed)."""
    options = dict(engine_options)
    cli_adapters = options.pop("adapters", None) or {}
    if options.get("threads") is None:  # a server leaves a core to its HTTP thread
        options["threads"] = serving_threads()
    engine_config = EngineConfig.from_options(**options)
    resolved = resolve_model(engine_config)
    if cli_adapters and engine_config.max_loras == 0:
        raise ValueError("--adapter: given, but --max-loras is 0; allow at least one adapter slot")
    store_dir = store_dir or engine_config.resolved_data_dir() / STORES_DIRNAME / store_slug(resolved.served_name)
    store = AdapterStore(store_dir, exclusive=True)  # before the model loads: a second server stops here
    try:
        engine = LLMEngine(engine_config, resolved.path)
    except BaseException:
        store.close()
        raise
    async_engine = AsyncEngine(engine, step_executor)
    state = ServerState(
        engine=async_engine,
        registry=AdapterRegistry(async_engine, store, resolved.served_name, publisher),
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


class Server(uvicorn.Server):
    """uvicorn's server, saying where to point a client."""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                logger.info("ready: point an OpenAI client at base_url=http://%s:%d/v1", host, port)


def make_server(app, config: ServerConfig) -> Server:
    """uvicorn over `app` with the connection guards of `config`, its flood-prone loggers rate-limited."""
    for name in FLOOD_LOGGERS:
        install_log_filter(logging.getLogger(name))
    protocol = functools.partial(http_protocol(), max_connections=connection_cap(config.max_connections),
                                 header_timeout=config.header_timeout)
    return Server(uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False,
                                 timeout_graceful_shutdown=config.shutdown_grace, lifespan="on", http=protocol,
                                 timeout_keep_alive=config.timeout_keep_alive))


# File descriptors the server needs besides its connections: the listening socket, the adapter store's
# database and files, model files being read, the log, torch's and asyncio's own.
FD_RESERVE = 256


def connection_cap(max_connections: int) -> int:
    """`max_connections`, with the soft open-file limit raised (up to its hard limit) to hold them and
    FD_RESERVE more; lowered, with a warning, where even the hard limit cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return max_connections
    cap = max(1, soft - FD_RESERVE)
    logger.warning("--max-connections %d needs %d open files, and the limit is %d (ulimit -Hn): serving at most "
                   "%d connections; raise the limit or lower --max-connections", max_connections, wanted, soft, cap)
    return cap


def _busy_response() -> bytes:
    body = json.dumps(error_body(503, "the server has all the connections --max-connections allows open; retry "
                                      "in a moment", code="too_many_connections")).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n")
    return head.encode() + body


_BUSY = _busy_response()


class ConnectionGuards:
    """The two guards uvicorn's HTTP protocols lack, mixed into either. A connection beyond
    `max_connections` is answered 503 and closed at once: uvicorn's own limit (limit_concurrency) looks
    only when a request arrives, so connections that send nothing pile up and hold their file
    descriptors. And a request's headers must all arrive within `header_timeout` seconds of the
    connection opening or of their first byte (uvicorn has no header timeout): a client that sends
    nothing, or trickles them, is dropped."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    connections: set

    def __init__(self, *args: Any, max_connections: int, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:  # this one among them
            transport.write(_BUSY)
            transport.close()
            return
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_timed_out(self) -> None:
        self.header_timer = None
        self.transport.close()


class GuardedH11Protocol(ConnectionGuards, H11Protocol):
    """uvicorn's pure-Python HTTP/1.1 protocol (h11), guarded: where httptools is not installed."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._await_headers()  # a request begun, its headers incomplete
        else:
            self._stop_header_timer()


class GuardedHttpToolsProtocol(ConnectionGuards, HttpToolsProtocol):
    """uvicorn's protocol over httptools (llhttp, in C), guarded: the default. Each streamed event costs
    less here than through h11's Python state machine, and the server's HTTP thread shares the GIL with
    the engine's steps (benchmarks/BENCHMARKS.md, "The server against the engine")."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await_headers()  # a request begun, its headers incomplete

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        super().on_headers_complete()


def http_protocol() -> type[ConnectionGuards]:
    """The guarded protocol over httptools when it is installed (a dependency), else over h11."""
    return GuardedHttpToolsProtocol if HttpToolsProtocol is not None else GuardedH11Protocol


# Where one bad client can make the same line thousands of times a second: asyncio (accept failing when
# the file descriptors run out), uvicorn (each connection's errors), our handler of unexpected errors.
FLOOD_LOGGERS = ("asyncio", "uvicorn.error", "loraplex.api.errors")


class RepeatFilter(logging.Filter):
    """Lets the first `burst` records of each kind (logger, level, message template, exception type)
    through per `interval` seconds and drops the rest; the first record of its kind after an interval with
    drops is preceded by one line: "N similar messages suppressed". At most `max_kinds` kinds are tracked
    (the oldest are forgotten), so distinct messages cannot grow it."""

    def __init__(self, burst: int = 5, interval: float = 60.0, max_kinds: int = 1024,
                 clock=time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.interval = interval
        self.max_kinds = max_kinds
        self.clock = clock
        self.lock = threading.Lock()
        self.kinds: dict[tuple, list] = {}  # kind -> [interval start, records seen in it, dropped in it]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, str(record.msg), record.exc_info and record.exc_info[0])
        now = self.clock()
        with self.lock:
            window = self.kinds.get(kind)
            if window is None or now - window[0] >= self.interval:
                dropped = window[2] if window else 0
                self.kinds.pop(kind, None)
                if len(self.kinds) >= self.max_kinds:
                    del self.kinds[next(iter(self.kinds))]
                self.kinds[kind] = window = [now, 0, 0]
            else:
                dropped = 0
            window[1] += 1
            passes = window[1] <= self.burst
            window[2] += not passes
        if dropped:
            logging.getLogger(record.name).log(record.levelno, "%d similar messages suppressed (at most %d a "
                                               "%.0f s): %.200s", dropped, self.burst, self.interval, record.msg)
        return passes


def install_log_filter(target: logging.Logger) -> None:
    """One RepeatFilter on `target`, however often it is called."""
    if not any(isinstance(f, RepeatFilter) for f in target.filters):
        target.addFilter(RepeatFilter())


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
