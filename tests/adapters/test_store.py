"""The durable adapter store: catalog round trips, durability across reopening, content sharing,
checksum verification, garbage collection, and crash leftovers (tmp dirs, orphan blobs, a failed
catalog write) that must never show up as adapters."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from loraplex.adapters_store import store as store_module
from loraplex.adapters_store.store import AdapterStore, CorruptAdapterError, StoreError, content_digest
from loraplex.errors import ErrorKind

FILES_A = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"weights-a" * 100}
FILES_B = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"weights-b" * 50}
INFO = {"rank": 8, "target_modules": ["q_proj", "v_proj"], "source": "upload"}


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


def stage(store: AdapterStore, files: dict[str, bytes]) -> Path:
    staged = store.staging_dir()
    for name, data in files.items():
        (staged / name).write_bytes(data)
    return staged


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_names(store: AdapterStore) -> set[str]:
    return {p.name for p in store.blobs.iterdir()}


def test_commit_get_list_delete_round_trip(store: AdapterStore) -> None:
    before = time.time()
    staged = stage(store, FILES_A)
    record = store.commit("zeta", staged, "peft-lora", INFO)

    files = {name: sha(data) for name, data in FILES_A.items()}
    assert record.name == "zeta" and record.format == "peft-lora" and record.info == INFO
    assert record.files == files
    assert record.digest == content_digest(files) == store_module.content_digest(dict(reversed(files.items())))
    assert record.path == store.root / "blobs" / record.digest
    assert record.size_bytes == sum(len(data) for data in FILES_A.values())
    assert before <= record.created <= time.time()
    assert not staged.exists(), "the staged directory is moved into the blobs"
    assert {p.name: p.read_bytes() for p in record.path.iterdir()} == FILES_A

    other = store.commit("alpha", stage(store, FILES_B), "peft-lora", {"rank": 4})
    assert store.get("zeta") == record
    assert store.get("missing") is None
    assert store.list() == [other, record], "sorted by name"

    assert store.delete("zeta") == record
    assert store.get("zeta") is None
    assert store.list() == [other]
    assert record.path.is_dir(), "delete leaves the blob for collect_garbage (running requests may read it)"
    with pytest.raises(StoreError, match="^name: adapter 'zeta' is not in the store") as info:
        store.delete("zeta")
    assert info.value.kind is ErrorKind.NOT_FOUND and info.value.field == "name"


def test_adapters_survive_reopening(store: AdapterStore) -> None:
    a = store.commit("a", stage(store, FILES_A), "peft-lora", INFO)
    b = store.commit("b", stage(store, FILES_B), "peft-lora", {"rank": 4, "nested": {"x": [1, 2]}})
    store.delete("b")

    reopened = AdapterStore(store.root)
    assert reopened.list() == [a]
    assert reopened.get("a") == a
    assert reopened.get("b") is None
    reopened.verify(a)
    assert reopened.collect_garbage() == 1 and not b.path.exists()


def test_duplicate_name_is_refused_and_changes_nothing(store: AdapterStore) -> None:
    first = store.commit("a", stage(store, FILES_A), "peft-lora", INFO)
    staged = stage(store, FILES_B)
    with pytest.raises(StoreError, match="^name: adapter 'a' already exists; delete it first") as info:
        store.commit("a", staged, "peft-lora", {"rank": 4})
    assert info.value.kind is ErrorKind.CONFLICT and info.value.code == "adapter_exists"
    assert store.list() == [first]
    assert blob_names(store) == {first.digest}, "the refused content is not placed in the blobs"
    assert staged.is_dir(), "the caller discards its staging dir"
    store.discard(staged)
    assert not staged.exists()
    store.discard(staged)  # already gone: no error


def test_replace_updates_the_row(store: AdapterStore) -> None:
    old = store.commit("a", stage(store, FILES_A), "peft-lora", INFO)
    new = store.commit("a", stage(store, FILES_B), "peft-lora", {"rank": 4}, replace=True)
    assert new.digest != old.digest
    assert store.list() == [new]
    assert AdapterStore(store.root).get("a") == new
    assert old.path.is_dir(), "the replaced blob stays until collect_garbage"
    assert store.collect_garbage() == 1
    assert not old.path.exists() and new.path.is_dir()


def test_same_content_under_two_names_shares_one_blob(store: AdapterStore) -> None:
    a = store.commit("a", stage(store, FILES_A), "peft-lora", INFO)
    staged = stage(store, FILES_A)
    b = store.commit("b", staged, "peft-lora", INFO)
    assert a.digest == b.digest and a.path == b.path
    assert blob_names(store) == {a.digest}
    assert not staged.exists()
    store.delete("a")
    assert store.collect_garbage() == 0, "the blob is still referenced by 'b'"
    store.verify(b)


def test_reuploading_repairs_a_damaged_blob(store: AdapterStore) -> None:
    a = store.commit("a", stage(store, FILES_A), "peft-lora", INFO)
    (a.path / "adapter_model.safetensors").write_bytes(b"bit rot")
    store.commit("b", stage(store, FILES_A), "peft-lora", INFO)
    store.verify(a)


def test_verify_detects_a_modified_file(store: AdapterStore) -> None:
    record = store.commit("a", stage(store, FILES_A), "peft-lora", INFO)
    store.verify(record)
    (record.path / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(CorruptAdapterError, match="adapter 'a': file 'adapter_model.safetensors' has sha256"):
        store.verify(record)


def test_verify_detects_a_missing_file(store: AdapterStore) -> None:
    record = store.commit("a", stage(store, FILES_A), "peft-lora", INFO)
    (record.path / "adapter_config.json").unlink()
    with pytest.raises(CorruptAdapterError, match="adapter 'a': file 'adapter_config.json' is missing"):
        store.verify(record)


def test_collect_garbage_removes_orphans_only(store: AdapterStore) -> None:
    referenced = store.commit("a", stage(store, FILES_A), "peft-lora", INFO)
    # crash after the rename into blobs, before the catalog commit: blobs without a row
    orphan, in_use = store.blobs / ("0" * 64), store.blobs / ("1" * 64)
    os.rename(stage(store, FILES_B), orphan)
    os.rename(stage(store, {"adapter_config.json": b"{}"}), in_use)

    assert store.collect_garbage(keep=[in_use]) == 1
    assert not orphan.exists()
    assert in_use.is_dir() and referenced.path.is_dir()
    assert list(store.tmp.iterdir()) == [], "removed blobs do not linger in tmp"
    assert store.collect_garbage() == 1, "once nothing keeps it, the unreferenced blob goes too"
    assert blob_names(store) == {referenced.digest}
    store.verify(referenced)


def test_leftover_uploads_are_removed_at_open(store: AdapterStore) -> None:
    kept = store.commit("a", stage(store, FILES_A), "peft-lora", INFO)
    # crash mid-upload: a half-written staging dir, and a stray file
    half = stage(store, {"adapter_config.json": b'{"r":'})
    (store.tmp / "stray").write_bytes(b"x")

    reopened = AdapterStore(store.root)
    assert list(reopened.tmp.iterdir()) == []
    assert not half.exists()
    assert reopened.list() == [kept]


def test_failed_catalog_write_leaves_the_catalog_unchanged(store: AdapterStore,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    kept = store.commit("a", stage(store, FILES_A), "peft-lora", INFO)
    real_connect = sqlite3.connect

    class FailingWrites:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, *args):
            if sql.lstrip().upper().startswith(("INSERT", "UPDATE")):
                raise sqlite3.OperationalError("disk I/O error (simulated)")
            return self.conn.execute(sql, *args)

        def __getattr__(self, name: str):
            return getattr(self.conn, name)

    monkeypatch.setattr(store_module.sqlite3, "connect", lambda *a, **k: FailingWrites(real_connect(*a, **k)))
    with pytest.raises(sqlite3.OperationalError, match="simulated"):
        store.commit("b", stage(store, FILES_B), "peft-lora", {"rank": 4})
    with pytest.raises(sqlite3.OperationalError, match="simulated"):
        store.commit("a", stage(store, FILES_B), "peft-lora", {"rank": 4}, replace=True)
    monkeypatch.undo()

    assert store.list() == [kept]
    reopened = AdapterStore(store.root)
    assert reopened.list() == [kept]
    assert reopened.collect_garbage() == 1, "the blob moved in before the failed write is an orphan"
    assert blob_names(reopened) == {kept.digest}


def test_staged_dir_must_come_from_the_store(store: AdapterStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_bytes(b"{}")
    with pytest.raises(StoreError, match="^staged: .* is not a staging directory") as info:
        store.commit("a", outside, "peft-lora", INFO)
    assert info.value.kind is ErrorKind.INVALID
    with pytest.raises(StoreError, match="not a staging directory"):
        store.discard(outside)
    with pytest.raises(StoreError, match="not a staging directory"):
        store.discard(store.tmp / "..")
    assert outside.is_dir() and store.root.is_dir()


def test_staged_dir_must_be_flat_and_not_empty(store: AdapterStore) -> None:
    staged = stage(store, FILES_A)
    (staged / "sub").mkdir()
    with pytest.raises(StoreError, match="^files: 'sub' in the upload is not a regular file"):
        store.commit("a", staged, "peft-lora", INFO)
    with pytest.raises(StoreError, match="^staged: .* is empty"):
        store.commit("a", store.staging_dir(), "peft-lora", INFO)
    with pytest.raises(StoreError, match="^info: adapter 'a': not JSON-serializable"):
        store.commit("a", stage(store, FILES_A), "peft-lora", {"rank": object()})
    assert store.list() == [] and blob_names(store) == set()


def test_commits_from_several_threads(store: AdapterStore) -> None:
    errors: list[Exception] = []

    def commit(i: int) -> None:
        try:
            files = {"adapter_config.json": b"{}", "adapter_model.safetensors": bytes([i % 3]) * 100}
            store.commit(f"a{i}", stage(store, files), "peft-lora", {"i": i})
        except Exception as e:  # reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [r.name for r in store.list()] == [f"a{i}" for i in range(8)]
    assert len(blob_names(store)) == 3
    for record in store.list():
        store.verify(record)


def test_an_exclusive_store_refuses_a_second_holder(tmp_path: Path) -> None:
    first = AdapterStore(tmp_path / "store", exclusive=True)
    staged = first.staging_dir()
    (staged / "adapter_config.json").write_text("{}")
    with pytest.raises(StoreError, match="^data_dir: .* is in use by another loraplex server") as info:
        AdapterStore(tmp_path / "store", exclusive=True)
    assert info.value.kind is ErrorKind.CONFLICT
    assert staged.is_dir(), "the second opener cleared an upload in flight"
    first.close()  # the first server stops
    AdapterStore(tmp_path / "store", exclusive=True)
