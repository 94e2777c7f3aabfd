"""The durable adapter store: a SQLite catalog (name -> files, checksums, metadata) over content-addressed
blob directories, laid out as

    root/catalog.sqlite3   one row per adapter name
    root/blobs/<digest>/   the files of one adapter content, shared by every name that holds it
    root/tmp/<uuid>/       uploads being written; whatever is left here at open was cut short by a crash

A commit writes and fsyncs the files in tmp, renames the directory into blobs (atomic), fsyncs blobs,
then inserts the catalog row in one transaction. A crash at any point leaves the old catalog or the
new one; a blob renamed in but never catalogued is removed by `collect_garbage`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters_store.checksums import file_sha256
from loraplex.errors import ErrorKind, LoraplexError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    files TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    format TEXT NOT NULL,
    created REAL NOT NULL,
    info TEXT NOT NULL
)
"""
_COLUMNS = "name, digest, files, size_bytes, format, created, info"


class StoreError(LoraplexError):
    """Bad input to the store: a name taken (CONFLICT) or unknown (NOT_FOUND), a staging directory
    that is not one (INVALID)."""


class CorruptAdapterError(RuntimeError):
    """A stored file is missing or no longer has the sha256 it was stored with."""


@dataclass(frozen=True)
class StoredAdapter:
    name: str
    digest: str  # sha256 hex over the sorted "filename:sha256\n" lines: the blob directory's name
    path: Path  # the blob directory holding the files (root/blobs/<digest>)
    files: dict[str, str]  # filename -> sha256 hex of that file
    size_bytes: int  # total bytes of the files
    format: str  # e.g. "peft-lora"
    created: float  # unix time of the commit
    info: dict[str, Any]  # JSON-able metadata given by the caller (rank, target_modules, source, ...)


def content_digest(files: dict[str, str]) -> str:
    """The blob name of a set of files: sha256 over their sorted "filename:sha256\\n" lines."""
    lines = "".join(f"{name}:{files[name]}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class AdapterStore:
    """Adapters kept across restarts under `root`. Safe to use from several threads: every operation
    opens its own SQLite connection, and the steps that must not interleave (placing a blob and
    cataloguing it, collecting garbage) run inside one write transaction."""

    def __init__(self, root: Path, exclusive: bool = False) -> None:
        """`exclusive`: hold the store for this process's lifetime (a server does), so a second process on
        the same directory stops with a clear error instead of clearing the first one's uploads in flight."""
        self.root = Path(root).resolve()
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.catalog = self.root / "catalog.sqlite3"
        for directory in (self.root, self.blobs, self.tmp):
            directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = self.hold(self.root / "lock") if exclusive else None
        for leftover in self.tmp.iterdir():
            _remove(leftover)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)

    def close(self) -> None:
        """Let go of an exclusive hold (the server stops)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @staticmethod
    def hold(path: Path):
        """An exclusive lock on `path`, held while the returned file stays open."""
        lock_file = open(path, "a+")  # noqa: SIM115 (held open: the lock lasts as long as the file is open)
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise StoreError("data_dir", f"the adapter store {path.parent} is in use by another loraplex server; "
                             "stop it, or give this one another --data-dir", ErrorKind.CONFLICT) from None
        return lock_file

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: no implicit transactions; writes run in explicit BEGIN IMMEDIATE blocks
        with closing(sqlite3.connect(self.catalog, timeout=30, isolation_level=None)) as conn:
            conn.execute("PRAGMA synchronous=FULL")
            yield conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, which also excludes every other writer (other threads and processes)."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite rolls back by itself after some errors (disk full, I/O)
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def staging_dir(self) -> Path:
        """A fresh empty directory under root/tmp to write an upload into."""
        path = self.tmp / uuid.uuid4().hex
        path.mkdir()
        return path

    def discard(self, staged: Path) -> None:
        """Remove a staging directory (after a failed validation, or a commit that moved it already)."""
        _remove(self._check_staged(staged))

    def _check_staged(self, staged: Path) -> Path:
        staged = Path(staged).resolve()
        if staged.parent != self.tmp:
            raise StoreError("staged", f"'{staged}' is not a staging directory of the store; write uploads into a "
                             f"directory from staging_dir() (under {self.tmp})")
        return staged

    def commit(self, name: str, staged: Path, format: str, info: dict[str, Any],
               replace: bool = False) -> StoredAdapter:
        """Store the files of `staged` (a flat directory from staging_dir()) as adapter `name`. The
        directory is moved into the blobs (or removed, when the same content is stored already)."""
        staged = self._check_staged(staged)
        if not name:
            raise StoreError("name", "adapter name is empty; give the adapter a name")
        try:
            info_json = json.dumps(info, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise StoreError("info", f"adapter '{name}': not JSON-serializable ({e}); pass plain values") from e
        files, size = self._hash_staged(staged)
        digest = content_digest(files)
        record = StoredAdapter(name=name, digest=digest, path=self.blobs / digest, files=files, size_bytes=size,
                               format=format, created=time.time(), info=json.loads(info_json))
        with self._transaction() as conn:
            exists = conn.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone() is not None
            if exists and not replace:
                raise StoreError("name", f"adapter '{name}' already exists; delete it first or commit with "
                                 "replace=True", ErrorKind.CONFLICT, code="adapter_exists")
            self._place_blob(staged, record)
            row = (digest, json.dumps(files, sort_keys=True), size, format, record.created, info_json, name)
            if exists:
                conn.execute("UPDATE adapters SET digest = ?, files = ?, size_bytes = ?, format = ?, created = ?, "
                             "info = ? WHERE name = ?", row)
            else:
                conn.execute("INSERT INTO adapters (digest, files, size_bytes, format, created, info, name) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", row)
        return record

    def _hash_staged(self, staged: Path) -> tuple[dict[str, str], int]:
        """{filename: sha256} and total size of the files of `staged`, each fsynced, and the directory too."""
        if not staged.is_dir():
            raise StoreError("staged", f"staging directory '{staged}' does not exist; write the upload into "
                             "staging_dir()")
        files, total = {}, 0
        for path in sorted(staged.iterdir()):
            if path.is_symlink() or not path.is_file():
                raise StoreError("files", f"'{path.name}' in the upload is not a regular file; an adapter is a "
                                 "flat directory of plain files")
            if "\n" in path.name:
                raise StoreError("files", f"file name {path.name!r} holds a line break; rename the file")
            files[path.name], size = file_sha256(path, sync=True)
            total += size
        if not files:
            raise StoreError("staged", f"staging directory '{staged}' is empty; write the adapter's files into "
                             "it first")
        _fsync_dir(staged)
        return files, total

    def _place_blob(self, staged: Path, record: StoredAdapter) -> None:
        """Move `staged` to the record's blob directory, or drop it when that blob holds the same files
        already. A blob that no longer matches its name (damaged on disk) is replaced by the new copy."""
        blob = record.path
        if blob.exists():
            try:
                self.verify(record)
            except CorruptAdapterError:
                broken = self.tmp / f"broken-{uuid.uuid4().hex}"
                os.rename(blob, broken)
                _remove(broken)
            else:
                _remove(staged)
                return
        os.rename(staged, blob)
        _fsync_dir(self.blobs)

    def get(self, name: str) -> StoredAdapter | None:
        with self._connect() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._record(row)

    def list(self) -> list[StoredAdapter]:
        """Every stored adapter, sorted by name."""
        with self._connect() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM adapters ORDER BY name").fetchall()
        return [self._record(row) for row in rows]

    def _record(self, row: tuple[Any, ...]) -> StoredAdapter:
        name, digest, files, size_bytes, format, created, info = row
        return StoredAdapter(name=name, digest=digest, path=self.blobs / digest, files=json.loads(files),
                             size_bytes=size_bytes, format=format, created=created, info=json.loads(info))

    def delete(self, name: str) -> StoredAdapter:
        """Remove the catalog row; the blob stays until `collect_garbage` (running requests may read it)."""
        with self._transaction() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise StoreError("name", f"adapter '{name}' is not in the store; check the name against the "
                                 "adapter list", ErrorKind.NOT_FOUND)
            conn.execute("DELETE FROM adapters WHERE name = ?", (name,))
        return self._record(row)

    def reinstate(self, record: StoredAdapter) -> None:
        """Put a record back as it was (undoing a replace whose follow-up failed); its blob must still
        be there, as it is until `collect_garbage` runs."""
        row = (record.name, record.digest, json.dumps(record.files, sort_keys=True), record.size_bytes,
               record.format, record.created, json.dumps(record.info, sort_keys=True))
        with self._transaction() as conn:
            conn.execute(f"INSERT OR REPLACE INTO adapters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", row)

    def verify(self, record: StoredAdapter) -> None:
        """Re-hash every file of the record; CorruptAdapterError names the first one missing or changed."""
        for file_name, expected in sorted(record.files.items()):
            path = record.path / file_name
            if not path.is_file():
                raise CorruptAdapterError(f"adapter '{record.name}': file '{file_name}' is missing from "
                                          f"{record.path}; delete the adapter and upload it again")
            found, _ = file_sha256(path)
            if found != expected:
                raise CorruptAdapterError(f"adapter '{record.name}': file '{file_name}' has sha256 {found}, "
                                          f"stored as {expected}; it was changed on disk; delete the adapter "
                                          "and upload it again")

    def collect_garbage(self, keep: Collection[Path] = ()) -> int:
        """Remove the blob directories no catalog row references, except those in `keep` (which running
        requests may still read). Returns how many were removed."""
        kept = {Path(path).resolve() for path in keep}
        doomed = []
        with self._transaction() as conn:  # no commit can catalogue (or reuse) a blob meanwhile
            referenced = {digest for (digest,) in conn.execute("SELECT DISTINCT digest FROM adapters")}
            for blob in sorted(self.blobs.iterdir()):
                if blob.name not in referenced and blob.resolve() not in kept:
                    # moved out first, so a crash mid-removal never leaves a partial blob under blobs/
                    doomed.append(self.tmp / f"gc-{uuid.uuid4().hex}")
                    os.rename(blob, doomed[-1])
        for path in doomed:
            _remove(path)
        return len(doomed)
