"""`loraplex serve --replicas 2` in a fresh process: a local Ray cluster, the application deployed on the
given port, completions answered by both replicas' engine, and a clean exit on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install -e '.[ray]')")


def test_serve_with_replicas_answers_and_stops_on_sigterm(demo_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "loraplex.cli", "serve", "--replicas", "2", "--replica-cpus", "0.5",
               "--model", str(demo_dir), "--adapter", f"alpha={demo_dir / 'adapters' / 'alpha'}",
               "--data-dir", str(tmp_path / "home"), "--port", str(port), "--device", "cpu", "--dtype", "float32",
               "--max-model-len", "128", "--kv-cache-memory", "16MiB", "--threads", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.5)
        replicas = set()
        for _ in range(40):
            r = httpx.get(f"{url}/v1/models", timeout=60)
            assert r.status_code == 200 and "alpha" in [m["id"] for m in r.json()["data"]]
            replicas.add(r.headers["x-loraplex-replica"])
            if len(replicas) == 2:
                break
        assert len(replicas) == 2
        answer = httpx.post(f"{url}/v1/completions", timeout=60,
                            json={"model": "alpha", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stdout.read()[-3000:]
