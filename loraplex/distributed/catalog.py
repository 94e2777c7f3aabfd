"""The cluster's one adapter catalog: the durable store (SQLite + content-addressed blobs) behind one
Ray actor, which every replica reads and writes through Ray calls (no shared filesystem).

A replica mirrors the catalog: before it handles a request it asks for the catalog's generation (one
actor call); when that moved since its last look it fetches the listing ({name: version}), copies the
files of each new or replaced adapter (checking their sha256) and drops the deleted ones. A change a
replica makes (an upload, a merge, a load, a delete) is validated by that replica's engine first and
then published here; the request is answered after the catalog has it, and every replica looks here
before its next request, so no replica serves an adapter after its delete was acknowledged.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters_store.store import AdapterStore, CorruptAdapterError, StoredAdapter, StoreError
from loraplex.errors import ErrorKind

CATALOG_ACTOR = "loraplex-catalog"  # the named actor, in the application's namespace


def version_of(record: StoredAdapter) -> str:
    """What changes when an adapter is replaced: its files' digest, and the commit time (a replace with
    the same files but a new recipe or source is a new version too)."""
    return f"{record.digest}:{record.created:.6f}"


@dataclass(frozen=True)
class CatalogEntry:
    """One adapter as the catalog hands it to a replica: its files' bytes and their sha256."""

    name: str
    version: str
    format: str
    info: dict[str, Any]
    files: dict[str, bytes]
    sha256: dict[str, str]

    def verify(self) -> None:
        """Each file's bytes against the sha256 the catalog recorded when it was committed."""
        for file_name, data in self.files.items():
            found = hashlib.sha256(data).hexdigest()
            if found != self.sha256.get(file_name):
                raise CorruptAdapterError(f"adapter '{self.name}': file '{file_name}' came with sha256 {found}, "
                                          f"the catalog holds {self.sha256.get(file_name)}; it was corrupted on "
                                          "the way")


class AdapterCatalog:
    """The store behind the catalog actor (`ray.remote(AdapterCatalog)`): plain methods, plain values."""

    def __init__(self, root: str) -> None:
        self.store = AdapterStore(Path(root), exclusive=True)
        # A new id on every start: a replica that saw the catalog before a restart looks again.
        self._epoch = uuid.uuid4().hex[:8]
        self._changes = 0

    def generation(self) -> str:
        return f"{self._epoch}-{self._changes}"

    def listing(self) -> tuple[str, dict[str, str]]:
        """(generation, {name: version}) of every stored adapter."""
        return self.generation(), {record.name: version_of(record) for record in self.store.list()}

    def fetch(self, name: str) -> CatalogEntry | None:
        record = self.store.get(name)
        if record is None:
            return None
        files = {file_name: (record.path / file_name).read_bytes() for file_name in record.files}
        return CatalogEntry(name, version_of(record), record.format, record.info, files, dict(record.files))

    def publish(self, name: str, format: str, info: dict[str, Any], files: dict[str, bytes],
                replace: bool = False) -> str:
        """Store an adapter a replica has validated (replacing one of that name only with `replace`: two
        replicas taking uploads of one name at once get one 201 and one 409, as one server would);
        returns its version."""
        staged = self.store.staging_dir()
        try:
            for file_name, data in files.items():
                if Path(file_name).name != file_name:
                    raise StoreError("files", f"'{file_name}' is not a plain file name")
                (staged / file_name).write_bytes(data)
            record = self.store.commit(name, staged, format, info, replace=replace)
        finally:
            if staged.exists():
                self.store.discard(staged)
        self._changes += 1
        return version_of(record)

    def delete(self, name: str) -> bool:
        """Remove an adapter; False when the catalog did not hold it."""
        try:
            self.store.delete(name)
        except StoreError as e:
            if e.kind is not ErrorKind.NOT_FOUND:
                raise
            return False
        self._changes += 1
        self.store.collect_garbage()
        return True

    def ping(self) -> bool:
        return True
