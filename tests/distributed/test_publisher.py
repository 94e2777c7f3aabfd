"""A replica's registry with a publisher (the cluster's catalog), without Ray: a change is acknowledged only
once published; when publishing fails, the replica serves what it served before (nothing, or the replaced
version), and a delete whose unpublish fails leaves the adapter served."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from loraplex.api.errors import APIError
from loraplex.api.server import build_app
from loraplex.config import ServerConfig


class Catalog:
    def __init__(self) -> None:
        self.published: dict[str, str] = {}  # name -> sha256 of the adapter's weights
        self.fail = False

    async def publish(self, record, replace: bool) -> None:
        if self.fail:
            raise ConnectionError("catalog unreachable")
        self.published[record.name] = record.info["sha256"]

    async def unpublish(self, name: str) -> None:
        if self.fail:
            raise ConnectionError("catalog unreachable")
        self.published.pop(name, None)


def test_changes_are_published_and_undone_when_publishing_fails(demo_dir, tmp_path):
    catalog = Catalog()
    options = dict(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=128, kv_cache_memory="16MiB",
                   data_dir=str(tmp_path / "home"), max_loras=2, threads=1)
    app = build_app(options, ServerConfig(), store_dir=tmp_path / "mirror", publisher=catalog)
    registry = app.state.loraplex.registry

    def staged(adapter: str):
        path = registry.store.staging_dir()
        for f in (demo_dir / "adapters" / adapter).iterdir():
            shutil.copy(f, path / f.name)
        return path

    async def run() -> None:
        async with app.router.lifespan_context(app):
            catalog.fail = True
            with pytest.raises(ConnectionError):
                await registry.add_staged("x", staged("alpha"), "upload")
            assert "x" not in registry and registry.store.get("x") is None and catalog.published == {}

            catalog.fail = False
            alpha = await registry.add_staged("x", staged("alpha"), "upload")
            assert catalog.published == {"x": alpha.sha256} and registry.store.get("x").info["sha256"] == alpha.sha256

            catalog.fail = True  # a replace that cannot be published: alpha stays, in the list and the store
            with pytest.raises(ConnectionError):
                await registry.add_staged("x", staged("beta"), "upload", replace=True)
            assert registry.infos["x"].sha256 == alpha.sha256 == registry.store.get("x").info["sha256"]
            assert catalog.published == {"x": alpha.sha256}

            with pytest.raises(ConnectionError):  # a delete the catalog did not take: still served
                await registry.delete("x")
            assert "x" in registry and registry.store.get("x") is not None

            catalog.fail = False
            await registry.delete("x")
            assert "x" not in registry and catalog.published == {}
            with pytest.raises(APIError):
                await registry.delete("x")
            # a change that came from the catalog is not sent back to it
            await registry.add_staged("y", staged("beta"), "upload", publish=False)
            assert "y" in registry and catalog.published == {}

    asyncio.run(run())
