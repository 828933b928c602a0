"""Streamed SHA-256 of files: a dependency-free helper shared by weights, ROIs and caches."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["HASH_CHUNK", "file_sha256", "read_with_sha256"]

HASH_CHUNK = 1 << 20  # bytes read per step while hashing: streams any file size in 1 MiB of memory


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed so that large files never sit in memory whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def read_with_sha256(path: Path) -> tuple[bytes, str]:
    """The file's bytes and their SHA-256, from one read: what is parsed is exactly what was hashed
    (a file replaced between a hash pass and a load pass cannot slip through)."""
    data = Path(path).read_bytes()
    return data, hashlib.sha256(data).hexdigest()
