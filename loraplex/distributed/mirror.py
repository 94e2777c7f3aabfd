"""A replica's copy of the cluster's adapter catalog (catalog.py), and where its own changes go.

`sync()` runs before every request a replica handles: one actor call when nothing changed; otherwise the
listing, then each new or replaced adapter's files (sha256 checked) through the registry's usual path
(validated by this replica's engine, stored in its local store), and each deleted one removed. As the
registry's publisher, it sends the adapters this replica stores to the catalog, and removes the ones it
deletes, before the request that made the change is answered.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from loraplex.adapters_store.store import StoredAdapter
from loraplex.api.errors import APIError
from loraplex.api.registry import AdapterRegistry
from loraplex.distributed.catalog import CatalogEntry

logger = logging.getLogger(__name__)


class CatalogMirror:
    def __init__(self, catalog: Any) -> None:
        self.catalog = catalog  # the catalog actor's handle (or anything with the same .remote methods)
        self.registry: AdapterRegistry | None = None  # set once the app exists
        self.versions: dict[str, str] = {}  # adapters copied from (or published to) the catalog
        self.seen: str | None = None  # the catalog generation this copy matches
        self._lock = asyncio.Lock()

    async def sync(self) -> None:
        generation = await self.catalog.generation.remote()
        if generation == self.seen:
            return
        async with self._lock:
            generation, listing = await self.catalog.listing.remote()
            if generation == self.seen:
                return
            complete = True  # only a sync that applied every change moves `seen`: a failed one is retried
            for name in [n for n in self.versions if n not in listing]:
                complete &= await self._drop(name)
            for name, version in listing.items():
                if self.versions.get(name) != version:
                    complete &= await self._copy(name)
            if complete:
                self.seen = generation

    async def _copy(self, name: str) -> bool:
        """Copy one adapter from the catalog; False if it failed (logged; not served here, retried at the
        next sync). A copy that fails never stops the replica's other requests."""
        registry = self.registry
        try:
            entry: CatalogEntry | None = await self.catalog.fetch.remote(name)
            if entry is None:  # deleted since the listing: the next sync drops it
                return True
            entry.verify()
            staged = registry.store.staging_dir()
            await asyncio.to_thread(_write_files, staged, entry.files)  # off the replica's event loop
            await registry.add_staged(name, staged, str(entry.info.get("source", "upload")), replace=True,
                                      recipe=entry.info.get("recipe"), publish=False)
        except Exception:
            logger.exception("adapter %s from the catalog is not served on this replica (retried at the next "
                             "request)", name)
            if name in self.versions:  # never serve a version the catalog has replaced
                await self._drop(name)
            return False
        self.versions[name] = entry.version
        return True

    async def _drop(self, name: str) -> bool:
        try:
            await self.registry.delete(name, publish=False)
        except APIError as e:
            if e.status != 404:
                logger.exception("adapter %s, deleted from the catalog, is still served here", name)
                return False
        except Exception:
            logger.exception("adapter %s, deleted from the catalog, is still served here", name)
            return False
        self.versions.pop(name, None)
        return True

    # -- Publisher ---------------------------------------------------------------------------------------

    async def publish(self, record: StoredAdapter, replace: bool) -> None:
        files = await asyncio.to_thread(_read_files, record)  # up to --max-adapter-size: off the event loop
        self.versions[record.name] = await self.catalog.publish.remote(record.name, record.format, record.info,
                                                                       files, replace)

    async def unpublish(self, name: str) -> None:
        await self.catalog.delete.remote(name)
        self.versions.pop(name, None)


def _write_files(directory: Path, files: dict[str, bytes]) -> None:
    for file_name, data in files.items():
        (directory / file_name).write_bytes(data)


def _read_files(record: StoredAdapter) -> dict[str, bytes]:
    return {file_name: (record.path / file_name).read_bytes() for file_name in record.files}
