"""Which adapters the server serves, where each came from, and the one path by which they change:
uploads and vLLM-style loads go through the durable store, then into the engine."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from loraplex.adapters_store.formats import LoRAAdapter
from loraplex.adapters_store.store import AdapterStore, StoredAdapter, StoreError
from loraplex.api.errors import APIError
from loraplex.api.protocol import MergeSource
from loraplex.arithmetic import MergeParams
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.llm_engine import validate_adapter_name
from loraplex.errors import ErrorKind
from loraplex.merging import Source, merge_directories

logger = logging.getLogger(__name__)

def _format(adapter: LoRAAdapter) -> str:
    """The file format: PEFT's (LoRA, DoRA), peft-rosa's (low-rank + sparse) or loraplex's sparse delta."""
    return {"sparse": "sparse-delta", "rosa": "peft-rosa"}.get(adapter.kind, "peft-lora")


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    format: str
    kind: str  # lora | dora | sparse | rosa
    rank: int
    nnz: int  # entries of the sparse parts (0 without)
    density: float  # nnz over the sizes of the modules that have a sparse part
    target_modules: list[str]
    size_bytes: int
    sha256: str  # of adapter_model.safetensors
    created: int  # unix time
    source: str  # upload | local (vLLM load) | cli (--adapter) | demo | merge
    stored: bool  # kept in the store: served again after a restart
    recipe: dict[str, Any] | None = None  # a merge's method, parameters and inputs (merge_recipe.json)

    def to_json(self, parent: str) -> dict[str, Any]:
        return {"id": self.name, "object": "adapter", "parent": parent, **asdict(self)}


def _describe(adapter: LoRAAdapter) -> dict[str, Any]:
    return {"kind": adapter.kind, "rank": adapter.rank, "nnz": adapter.nnz, "density": adapter.density,
            "target_modules": adapter.target_modules, "sha256": adapter.sha256}


class Publisher(Protocol):
    """Where a registry's stored changes go besides its own store: the cluster's catalog, for a replica
    (loraplex/distributed). `publish` runs after the change is validated and served here, and before it is
    acknowledged; if it raises, the change is undone here and the request fails."""

    async def publish(self, record: StoredAdapter, replace: bool) -> None: ...

    async def unpublish(self, name: str) -> None: ...


class AdapterRegistry:
    def __init__(self, engine: AsyncEngine, store: AdapterStore, base_name: str,
                 publisher: Publisher | None = None) -> None:
        self.engine = engine
        self.store = store
        self.base_name = base_name
        self.publisher = publisher  # None: one server, its store is the catalog
        self.infos: dict[str, AdapterInfo] = {}
        self.unavailable: set[str] = set()  # stored, but not served since the restart (files gone)
        self._lock = asyncio.Lock()  # one change at a time: checks, store and engine stay in step

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    async def restore(self) -> None:
        """Serve every stored adapter again. Their files are read (and their checksums checked) at
        first use, so a server with many adapters starts at once. One whose files cannot be found or
        read, or that the engine refuses, is logged and not served; its name can be deleted or
        uploaded again (its catalog row stays, in case its volume is only briefly away)."""
        for record in await asyncio.to_thread(self.store.list):
            try:
                missing = [f for f in record.files if not (record.path / f).is_file()]
            except OSError as e:
                missing = [f"the files ({e})"]
            if missing:
                logger.error("stored adapter %s: %s not found under %s; not served (delete or upload it again)",
                             record.name, ", ".join(missing), record.path)
                self.unavailable.add(record.name)
                continue
            try:
                await self.engine.add_adapter(record.name, record.path, checksums=record.files)
            except ValueError as e:
                logger.error("stored adapter %s is not served: %s", record.name, e)
                self.unavailable.add(record.name)
                continue
            self.infos[record.name] = self._stored_info(record)
        removed = await asyncio.to_thread(self.store.collect_garbage)
        if removed:
            logger.info("removed %d adapter blob(s) no longer in the catalog", removed)

    async def add_local(self, name: str, path: Path, source: str) -> AdapterInfo:
        """Serve a directory as it is, for this run only (`--adapter`, the demo adapters)."""
        async with self._lock:
            self._check_name(name, replace=True)
            try:
                adapter = await self.engine.inspect_adapter(path)
            except ValueError:  # its message names the file at fault, not the directory
                logger.error("adapter %s: %s is refused", name, path)
                raise
            await self.engine.add_adapter(name, path, preloaded=adapter)
            files = [p for p in path.iterdir() if p.is_file()]
            info = AdapterInfo(name=name, format=_format(adapter), size_bytes=sum(p.stat().st_size for p in files),
                               created=int(max(p.stat().st_mtime for p in files)), source=source, stored=False,
                               **_describe(adapter))
            self.infos[name] = info
            return info

    async def add_merged(self, name: str, sources: list[MergeSource], params: MergeParams,
                         replace: bool = False) -> AdapterInfo:
        """Merge served adapters into a new stored one (as an upload of the result, with its recipe)."""
        self._check_name(name, replace)  # before the work; checked again under the lock
        inputs = []
        for source in sources:
            info = self.infos.get(source.name)
            if info is None:
                raise APIError(404, f"sources: adapter '{source.name}' does not exist", param="sources",
                               code="adapter_not_found")
            inputs.append(Source(name=source.name, path=await self.engine.adapter_path(source.name),
                                 weight=source.weight, loss=source.loss, step=source.step, sha256=info.sha256))
        staged = self.store.staging_dir()
        try:
            recipe = await asyncio.to_thread(merge_directories, inputs, params, staged, self.engine.model_config,
                                             self.engine.max_lora_rank)
        except BaseException:
            self.store.discard(staged)
            raise
        return await self.add_staged(name, staged, "merge", replace, recipe=recipe)

    async def add_staged(self, name: str, staged: Path, source: str, replace: bool = False,
                         recipe: dict[str, Any] | None = None, publish: bool = True) -> AdapterInfo:
        """Validate an upload staged in the store's tmp dir, store it durably, then serve it (and, with a
        publisher, publish it; `publish=False` for a change that came from the publisher's catalog). A
        refusal raises LoraplexError (the app answers it as its kind says) or APIError. On any error the
        staged files are discarded and the catalog, the engine and the list stay as they were."""
        try:
            async with self._lock:
                self._check_name(name, replace)
                adapter = await self.engine.inspect_adapter(staged)
                info = {**_describe(adapter), "source": source, **({"recipe": recipe} if recipe else {})}
                previous = await asyncio.to_thread(self.store.get, name)
                record = await asyncio.to_thread(self.store.commit, name, staged, _format(adapter), info,
                                                 replace or name in self.unavailable)
                try:
                    await self.engine.add_adapter(name, record.path, checksums=record.files, preloaded=adapter)
                except BaseException:
                    await asyncio.to_thread(self._restore_row, name, previous)
                    raise
                if publish and self.publisher is not None:
                    try:
                        await self.publisher.publish(record, replace or name in self.unavailable)
                    except BaseException:
                        await self._undo_add(name, previous)
                        raise
                self.infos[name] = self._stored_info(record)
                self.unavailable.discard(name)
                logger.info("adapter %s stored (%s, rank %d, %d bytes)", name, source, adapter.rank,
                            record.size_bytes)
                return self.infos[name]
        finally:
            self.store.discard(staged)

    async def _undo_add(self, name: str, previous: StoredAdapter | None) -> None:
        """Serve what was served before an add whose publication failed (or nothing)."""
        await asyncio.to_thread(self._restore_row, name, previous)
        if previous is None:
            await self.engine.remove_adapter(name)
            self.infos.pop(name, None)
        else:
            await self.engine.add_adapter(name, previous.path, checksums=previous.files)
            self.infos[name] = self._stored_info(previous)

    def _restore_row(self, name: str, previous: StoredAdapter | None) -> None:
        if previous is None:
            self.store.delete(name)
        else:
            self.store.reinstate(previous)

    async def delete(self, name: str, publish: bool = True) -> AdapterInfo | None:
        """Requests already accepted on the adapter finish; new ones get 404. Returns what was served
        (None for a stored adapter that was not served since the restart). With a publisher, the
        catalog's copy goes first (`publish=False`: the delete came from the catalog)."""
        async with self._lock:
            info = self.infos.get(name)
            if info is None and name not in self.unavailable:
                raise APIError(404, f"adapter '{name}' does not exist", param="name", code="adapter_not_found")
            if publish and self.publisher is not None:
                if info is not None and not info.stored:  # each replica serves its own copy for the run
                    raise APIError(409, f"adapter '{name}' was given at start (--adapter, or the demo's) and is "
                                   "served by every replica for this run; it cannot be deleted on a cluster",
                                   param="name", code="adapter_not_stored")
                await self.publisher.unpublish(name)
            if info is None or info.stored:  # the catalog first: if it fails, nothing else has changed
                try:
                    await asyncio.to_thread(self.store.delete, name)
                except StoreError as e:
                    if e.kind is not ErrorKind.NOT_FOUND:
                        raise
                    logger.warning("adapter %s had no catalog row left (an earlier delete was cut short)", name)
            self.unavailable.discard(name)
            if info is not None:
                await self.engine.remove_adapter(name)
                del self.infos[name]
            in_use = await self.engine.adapter_paths_in_use()
            await asyncio.to_thread(self.store.collect_garbage, in_use)
            logger.info("adapter %s deleted", name)
            return info

    def _check_name(self, name: str, replace: bool) -> None:
        validate_adapter_name(name)
        if name == self.base_name:
            raise APIError(409, f"'{name}' is the base model's name; choose another adapter name", param="name",
                           code="name_taken")
        if name in self.infos and not replace:
            raise APIError(409, f"adapter '{name}' already exists; DELETE /v1/adapters/{name} first (or load it "
                           "with load_inplace)", param="name", code="adapter_exists")

    @staticmethod
    def _stored_info(record: StoredAdapter) -> AdapterInfo:
        return AdapterInfo(name=record.name, format=record.format, kind=str(record.info.get("kind", "lora")),
                           rank=int(record.info["rank"]), nnz=int(record.info.get("nnz", 0)),
                           density=float(record.info.get("density", 0.0)),
                           target_modules=list(record.info["target_modules"]), size_bytes=record.size_bytes,
                           sha256=str(record.info["sha256"]), created=int(record.created),
                           source=str(record.info.get("source", "upload")), stored=True,
                           recipe=record.info.get("recipe"))
