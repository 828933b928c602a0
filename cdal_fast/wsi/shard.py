"""``--shard I/N``: a deterministic 1/N of the discovered inputs, for job arrays (Slurm, PBS, ...).

N independent jobs run the same command with I = 0 .. N-1; together they must process every
input exactly once, whatever order each job discovered the files in and whatever else is in its
list. So an input's shard is chosen by a stable key, not by its list position: the SHA-256 of its
path relative to the command-line input that found it (a folder argument), or of its file name
(a file argument). Absolute paths are avoided so that nodes mounting the shared storage at
different points still agree.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["ShardError", "parse_shard", "shard_key", "shard_of", "select_shard"]

KEY_BYTES = 8  # first 64 bits of the digest: uniform enough for any N a job array uses


class ShardError(ValueError):
    """A malformed ``--shard`` value."""


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, ``0 <= I < N``; I is 0-based like ``$SLURM_ARRAY_TASK_ID`` with ``--array=0-(N-1)``."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ShardError(f"--shard {text!r}: expected I/N with whole numbers, e.g. 0/4")
    index, count = int(parts[0]), int(parts[1])
    if count < 1 or not 0 <= index < count:
        raise ShardError(f"--shard {text!r}: need N >= 1 and 0 <= I < N (I is 0-based), got I={index}, N={count}")
    return index, count


def shard_key(path: Path, roots: list[Path]) -> str:
    """The stable name of ``path``: relative to the first folder in ``roots`` that holds it, else its name."""
    resolved = path.resolve()
    for root in roots:
        r = root.resolve()
        if r.is_dir() and resolved != r and resolved.is_relative_to(r):
            return resolved.relative_to(r).as_posix()
    return path.name


def shard_of(key: str, count: int) -> int:
    """Which of ``count`` shards ``key`` belongs to (the same on every machine and Python version)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:KEY_BYTES], "big") % count


def select_shard(files: list[Path], roots: list[Path], index: int, count: int) -> list[Path]:
    """The inputs of shard ``index`` of ``count`` (order kept)."""
    return [f for f in files if shard_of(shard_key(f, roots), count) == index]
