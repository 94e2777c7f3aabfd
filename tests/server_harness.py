"""A live server on 127.0.0.1 (a random port) over the tiny demo model, driven over real HTTP.

The server runs in a thread of the test process (uvicorn, the app and the engine exactly as
`loraplex serve` builds them); the process-level behaviour (SIGTERM, restart) is tested with a
subprocess in test_server_process.py.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import openai

from loraplex.config import ServerConfig
from loraplex.models.demo import DEMO_ADAPTERS

API_KEY = "inference-key-1"
ADMIN_KEY = "admin-key-123"


@dataclass
class LiveServer:
    url: str
    app: object
    data_dir: Path

    @property
    def state(self):
        return self.app.state.loraplex

    def client(self, api_key: str = API_KEY, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)


def engine_options(demo_dir: Path, data_dir: Path, **overrides) -> dict:
    options = {
        "model": str(demo_dir), "dtype": "float32", "device": "cpu", "max_model_len": 512,
        "kv_cache_memory": "64MiB", "data_dir": str(data_dir), "max_loras": 4, "max_lora_rank": 16,
        "adapters": {name: str(demo_dir / "adapters" / name) for name in DEMO_ADAPTERS},
    }
    options.update(overrides)
    return options


@contextlib.contextmanager
def run_server(engine_opts: dict, config: ServerConfig) -> Iterator[LiveServer]:
    from loraplex.api.server import build_app, make_server

    app = build_app(engine_opts, config)
    server = make_server(app, replace(config, host="127.0.0.1", port=0))
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", app, Path(engine_opts["data_dir"]))
    finally:
        server.should_exit = True
        thread.join(60)
