"""SIGTERM with requests still running at the end of --shutdown-grace: each gets an OpenAI-shaped 503
(non-streamed) or a final error event and [DONE] (streamed), not a plain-text 500 or a cut stream."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from test_server_process import ServerProcess

# Sequences enough that they cannot finish within the grace on the tiny model on a CPU.
LONG = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0, "ignore_eos": True,
        "n": 16}


@pytest.fixture
def server(demo_dir, tmp_path):
    server = ServerProcess(demo_dir, tmp_path / "home", tmp_path / "server.log", "--shutdown-grace", "1")
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


def test_requests_still_running_after_the_grace_get_503_or_an_error_event(server):
    result: dict = {}

    def whole() -> None:
        result["whole"] = httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=60)

    def streamed() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**LONG, "stream": True},
                          timeout=60) as stream:
            result["events"] = []
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    result["events"].append(line[6:])

    threads = [threading.Thread(target=whole), threading.Thread(target=streamed)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(result.get("events", [])) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stop() == 0
    for thread in threads:
        thread.join(30)

    whole = result["whole"]
    assert whole.status_code == 503, whole.text
    error = whole.json()["error"]
    assert error["code"] == "server_shutting_down" and "shutting down" in error["message"], error

    events = result["events"]
    assert events[-1] == "[DONE]", events[-3:]
    final = json.loads(events[-2])
    assert set(final) == {"error"} and final["error"]["code"] == "server_shutting_down", final
    assert all("choices" in json.loads(e) for e in events[:-2]), "one error event, at the end"
