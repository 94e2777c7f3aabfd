"""`loraplex serve` as a process: it says where to point a client, SIGTERM lets in-flight requests
finish and exits 0, stored adapters are served again after a restart, and a stored file changed on
disk is caught by its checksum instead of being served."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

ADMIN_KEY = "admin-key-process"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, demo_dir: Path, data_dir: Path, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(demo_dir), "--data-dir",
                   str(data_dir), "--port", str(self.port), "--dtype", "float32", "--device", "cpu",
                   "--max-model-len", "512", "--kv-cache-memory", "64MiB", "--admin-key", ADMIN_KEY, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def complete(self, model: str, max_tokens: int = 8) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/completions", timeout=60, json={
            "model": model, "prompt": "The quick brown fox", "max_tokens": max_tokens, "temperature": 0})


def upload(server: ServerProcess, name: str, adapter_dir: Path) -> httpx.Response:
    parts = [("files", (f.name, f.read_bytes())) for f in sorted(adapter_dir.iterdir()) if f.is_file()]
    return httpx.post(f"{server.url}/v1/adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      data={"name": name}, files=parts, timeout=60)


@pytest.fixture
def started(demo_dir, tmp_path):
    servers: list[ServerProcess] = []

    def start(*extra: str) -> ServerProcess:
        server = ServerProcess(demo_dir, tmp_path / "home", tmp_path / f"server-{len(servers)}.log", *extra)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def test_sigterm_finishes_in_flight_requests_and_exits_0(started):
    server = started("--shutdown-grace", "30")
    assert f"base_url=http://127.0.0.1:{server.port}/v1" in server.log.read_text()
    result: dict = {}

    def long_stream() -> None:
        body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0,
                "ignore_eos": True, "stream": True}
        texts, reasons = [], []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    texts.append(choice["text"])
                    reasons.append(choice["finish_reason"])
                    result["started"] = True
                elif line == "data: [DONE]":
                    result["done"] = True
        result["reasons"] = [r for r in reasons if r]

    thread = threading.Thread(target=long_stream)
    thread.start()
    deadline = time.monotonic() + 30
    while "started" not in result and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stop() == 0
    thread.join(10)
    assert result.get("done") and result["reasons"] == ["length"], "the in-flight stream was cut short"
    assert "Shutting down" in server.log.read_text() or "stopping" in server.log.read_text()


def test_stored_adapters_survive_a_restart(started, demo_dir):
    first = started()
    assert upload(first, "kept", demo_dir / "adapters" / "beta").status_code == 201
    text = first.complete("kept").json()["choices"][0]["text"]
    assert first.stop() == 0

    second = started()
    models = {m["id"] for m in httpx.get(f"{second.url}/v1/models").json()["data"]}
    assert "kept" in models
    again = second.complete("kept")
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == text
    info = httpx.get(f"{second.url}/v1/adapters/kept").json()
    assert info["stored"] is True and info["rank"] == 8
    assert second.stop() == 0


def test_a_stored_file_changed_on_disk_is_refused_by_its_checksum(started, demo_dir, tmp_path):
    first = started()
    assert upload(first, "tampered", demo_dir / "adapters" / "alpha").status_code == 201
    assert first.stop() == 0
    weights = next((tmp_path / "home" / "adapters").rglob("adapter_model.safetensors"))
    tensors = load_file(weights)
    key = next(iter(tensors))
    tensors[key] = tensors[key] * 2  # same shapes, other values: only a checksum can tell
    save_file(tensors, weights)

    second = started()
    resp = second.complete("tampered")
    assert resp.status_code == 500 and "sha256" in resp.json()["error"]["message"]
    assert second.complete("demo").status_code == 200, "the server keeps serving everything else"
    assert second.stop() == 0
