"""File checksums, read in chunks: what the store records and every load from disk checks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1 << 20


def file_sha256(path: Path, sync: bool = False) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file read in chunks; with `sync`, fsync it too."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest(), size
