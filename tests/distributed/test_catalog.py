"""The catalog behind the cluster's actor, as a plain object: publish, fetch with the sha256 check, a second
publish of a name refused unless it replaces (two replicas' concurrent uploads: one 201, one 409), deletes,
and a generation that moves with every change and with every restart."""

from __future__ import annotations

import dataclasses

import pytest

from loraplex.adapters_store.store import CorruptAdapterError, StoreError
from loraplex.distributed.catalog import AdapterCatalog
from loraplex.errors import ErrorKind

FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"\x00weights\x01"}


def test_publish_fetch_conflict_replace_delete(tmp_path):
    catalog = AdapterCatalog(str(tmp_path / "catalog"))
    start = catalog.generation()
    version = catalog.publish("a", "peft-lora", {"rank": 4}, FILES)
    assert catalog.generation() != start and catalog.listing()[1] == {"a": version}
    entry = catalog.fetch("a")
    entry.verify()
    assert entry.files == FILES and entry.info == {"rank": 4} and entry.version == version

    with pytest.raises(StoreError) as refused:  # the second of two concurrent uploads of one name
        catalog.publish("a", "peft-lora", {"rank": 4}, {**FILES, "adapter_config.json": b'{"r": 8}'})
    assert refused.value.kind is ErrorKind.CONFLICT and catalog.fetch("a").version == version

    replaced = catalog.publish("a", "peft-lora", {"rank": 8}, {**FILES, "adapter_config.json": b'{"r": 8}'},
                               replace=True)
    assert replaced != version and catalog.fetch("a").files["adapter_config.json"] == b'{"r": 8}'

    before = catalog.generation()
    assert catalog.delete("a") and catalog.fetch("a") is None and catalog.listing()[1] == {}
    assert catalog.generation() != before and catalog.delete("a") is False


def test_a_corrupted_copy_fails_its_check_and_a_restart_is_a_new_generation(tmp_path):
    catalog = AdapterCatalog(str(tmp_path / "catalog"))
    catalog.publish("a", "peft-lora", {}, FILES)
    entry = catalog.fetch("a")
    damaged = dataclasses.replace(entry, files={**entry.files, "adapter_model.safetensors": b"\x00weightz\x01"})
    with pytest.raises(CorruptAdapterError, match="adapter_model.safetensors"):
        damaged.verify()
    with pytest.raises(StoreError):  # a path, not a file name
        catalog.publish("b", "peft-lora", {}, {"../x": b"1"})
    generation = catalog.generation()
    catalog.store.close()
    again = AdapterCatalog(str(tmp_path / "catalog"))  # what Ray does when the actor restarts
    assert again.generation() != generation and again.listing()[1] == catalog.listing()[1]
