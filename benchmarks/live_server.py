"""What the benchmarks that drive `loraplex serve` in a subprocess share: a free port, and waiting
until the server answers."""

from __future__ import annotations

import socket
import time

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, seconds: float = 60) -> str:
    """Poll /health until the server answers; returns the base model's served name."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} did not answer within {seconds:.0f} s")
        time.sleep(0.1)
