"""The `live_server` fixture: one server per test module (see server_harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from server_harness import ADMIN_KEY, API_KEY, LiveServer, engine_options, run_server

from loraplex.config import ServerConfig


@pytest.fixture(scope="module")
def live_server(demo_dir, tmp_path_factory) -> Iterator[LiveServer]:
    """One server per test module, with API and admin keys and the demo adapters alpha/beta/gamma."""
    data_dir = tmp_path_factory.mktemp("server-home")
    config = ServerConfig(api_key=API_KEY, admin_key=ADMIN_KEY, max_adapter_size="8MiB", max_body_size="1MiB",
                          allowed_local_adapter_dir=str(demo_dir / "adapters"))
    with run_server(engine_options(demo_dir, data_dir), config) as server:
        yield server
