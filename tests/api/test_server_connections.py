"""The server's connection options reach uvicorn, the open-file limit holds the connections, and the
log filter that keeps a flood of one message from filling the log. (No live server: see
tests/e2e/test_server_hardening.py for connections against a real one.)"""

from __future__ import annotations

import logging
import resource

import pytest
from fastapi import FastAPI

from loraplex.api import server as server_module
from loraplex.api.server import (
    FD_RESERVE,
    FLOOD_LOGGERS,
    GuardedHttpToolsProtocol,
    RepeatFilter,
    connection_cap,
    make_server,
)
from loraplex.config import ServerConfig


def test_connection_options_reach_uvicorn():
    config = ServerConfig(timeout_keep_alive=2.5, header_timeout=3.0, max_connections=7, shutdown_grace=4.0)
    uvicorn_config = make_server(FastAPI(), config).config
    assert uvicorn_config.timeout_keep_alive == 2.5 and uvicorn_config.timeout_graceful_shutdown == 4.0
    assert uvicorn_config.http.func is GuardedHttpToolsProtocol  # httptools is a dependency
    assert uvicorn_config.http.keywords == {"max_connections": 7, "header_timeout": 3.0}
    for name in FLOOD_LOGGERS:
        assert sum(isinstance(f, RepeatFilter) for f in logging.getLogger(name).filters) == 1


class Limits:
    def __init__(self, soft: int, hard: int) -> None:
        self.soft, self.hard = soft, hard

    def getrlimit(self, which: int) -> tuple[int, int]:
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert limits[1] == self.hard, "the hard limit is never changed"
        self.soft = limits[0]


@pytest.mark.parametrize(("soft", "hard", "raised_to"), [(1024, 1 << 20, 1000 + FD_RESERVE),
                                                         (1 << 16, 1 << 20, 1 << 16)])
def test_the_open_file_limit_is_raised_to_hold_the_connections(monkeypatch, soft, hard, raised_to):
    limits = Limits(soft, hard)
    monkeypatch.setattr(resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", limits.setrlimit)
    assert connection_cap(1000) == 1000
    assert limits.soft == raised_to


def test_connections_beyond_the_hard_limit_are_lowered_with_a_warning(monkeypatch, caplog):
    limits = Limits(512, 1024)
    monkeypatch.setattr(resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", limits.setrlimit)
    with caplog.at_level(logging.WARNING, logger=server_module.__name__):
        assert connection_cap(5000) == 1024 - FD_RESERVE
    assert limits.soft == 1024
    assert "--max-connections 5000" in caplog.text and "ulimit" in caplog.text


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def flooded():
    """A logger with a RepeatFilter (5 a minute) on a fake clock, and the messages that got through."""
    clock = Clock()
    logger = logging.getLogger("loraplex.test.flood")
    logger.propagate = False
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    logger.addFilter(RepeatFilter(burst=5, interval=60, clock=clock))
    yield logger, clock, seen
    logger.removeHandler(handler)
    logger.filters.clear()


def test_repeated_lines_pass_five_a_minute_then_one_summary(flooded):
    logger, clock, seen = flooded
    for i in range(1000):
        logger.error("accept failed on fd %d", i)
    assert seen == [f"accept failed on fd {i}" for i in range(5)]
    clock.now = 61
    logger.error("accept failed on fd %d", 1000)
    assert seen[5:] == ["995 similar messages suppressed (at most 5 a 60 s): accept failed on fd %d",
                        "accept failed on fd 1000"]


def test_different_lines_and_exceptions_are_counted_apart(flooded):
    logger, _, seen = flooded
    for _ in range(10):
        logger.warning("one")
        logger.warning("two")
        for error in (ValueError, KeyError):
            try:
                raise error
            except error:
                logger.exception("failed")
    assert seen == ["one", "two", "failed", "failed"] * 5


def test_the_filter_forgets_the_oldest_kinds_past_its_bound():
    repeat = RepeatFilter(burst=1, interval=60, max_kinds=3, clock=Clock())
    records = [logging.LogRecord("x", logging.INFO, "", 0, f"line {i}", None, None) for i in range(10)]
    assert all(repeat.filter(record) for record in records)
    assert len(repeat.kinds) == 3
