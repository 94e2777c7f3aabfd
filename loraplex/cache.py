"""What the data dir holds (`loraplex cache info | clear`): the converted default model and the tiny demo
model, which are made again on demand, and the adapter stores of `loraplex serve`, which hold uploaded
adapters and are only removed when asked for by name. Torch-free."""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from loraplex.errors import conflict
from loraplex.models.default_model import SERVED_NAME as DEFAULT_MODEL_DIRNAME

TINY_MODEL_DIRNAME = "demo-tiny"
STORES_DIRNAME = "adapters"  # api/server.py keeps one store per base model under it
_DELETING = ".deleting."  # an adapter store set aside by `clear`, being deleted
# What loraplex leaves behind: an older version's downloads, and the temporary directories of an interrupted
# download, conversion, tiny-model write or deletion. Anything else in the data dir is not loraplex's: listed,
# never removed.
_LEFTOVER_NAMES = {"downloads"}
_LEFTOVER_PREFIXES = (".download.", f".{DEFAULT_MODEL_DIRNAME}.", f".{TINY_MODEL_DIRNAME}.", _DELETING)


@dataclass(frozen=True)
class Entry:
    path: Path
    kind: str  # model | adapter store | leftover | other (not loraplex's: never removed)
    what: str
    size: int  # bytes

    @property
    def regenerable(self) -> bool:
        return self.kind in ("model", "leftover")


def entries(data_dir: Path) -> list[Entry]:
    """Everything in the data dir, one entry per model, adapter store or leftover (an older version's
    downloads, an interrupted conversion)."""
    if not data_dir.is_dir():
        return []
    found = []
    for path in sorted(data_dir.iterdir()):
        if path.name == DEFAULT_MODEL_DIRNAME:
            found.append(Entry(path, "model", "SmolLM2-135M-Instruct, converted (the default model)", _size(path)))
        elif path.name == TINY_MODEL_DIRNAME:
            found.append(Entry(path, "model", "the tiny random demo model", _size(path)))
        elif path.name == STORES_DIRNAME and path.is_dir():
            for store in sorted(p for p in path.iterdir() if p.is_dir()):
                blobs = store / "blobs"
                count = sum(1 for _ in blobs.iterdir()) if blobs.is_dir() else 0
                found.append(Entry(store, "adapter store", f"uploaded adapters for {store.name} ({count} files)",
                                   _size(store)))
        elif path.name in _LEFTOVER_NAMES or path.name.startswith(_LEFTOVER_PREFIXES):
            found.append(Entry(path, "leftover", "not used by this version", _size(path)))
        else:
            found.append(Entry(path, "other", "not made by loraplex: kept", _size(path)))
    return found


def clear(data_dir: Path, adapter_stores: bool = False) -> list[Entry]:
    """Remove the regenerable entries (and the adapter stores too with `adapter_stores`; refused for a
    store that a running server holds). Refused while a server runs on this data dir (it may be reading
    the models and adapters this would remove). Returns what was removed."""
    for entry in entries(data_dir):
        if entry.kind == "adapter store" and _held(entry.path):
            raise conflict("data_dir", f"a loraplex server is running on {data_dir} (it holds {entry.path}); "
                           "stop it first")
    removed = []
    for entry in entries(data_dir):
        if entry.kind == "adapter store":
            if not adapter_stores:
                continue
            _remove_store(entry.path, data_dir)
        elif not entry.regenerable:
            continue
        elif entry.path.is_dir() and not entry.path.is_symlink():
            shutil.rmtree(entry.path)
        else:
            entry.path.unlink()
        removed.append(entry)
    stores = data_dir / STORES_DIRNAME
    if stores.is_dir() and not any(stores.iterdir()):
        stores.rmdir()
    return removed


def _remove_store(store: Path, data_dir: Path) -> None:
    """Delete an adapter store no server holds. Its lock is held until the store has moved aside: a server
    starting meanwhile either finds it held (and stops) or opens a new, empty store where it was, never one
    being deleted."""
    with (store / "lock").open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise conflict("data_dir", f"the adapter store {store} is in use by a running server; stop it "
                           "first") from None
        aside = Path(tempfile.mkdtemp(prefix=_DELETING, dir=data_dir)) / store.name
        store.rename(aside)
    shutil.rmtree(aside.parent)


def _held(store: Path) -> bool:
    lock = store / "lock"
    if not lock.exists():
        return False
    with lock.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
