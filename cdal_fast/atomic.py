"""Atomic file output: write under a hidden partial name, rename when complete.

Every artefact the project writes (weights, checkpoints, exports, masks, summaries) goes through
:func:`atomic_output`, so an interrupted run never leaves a file that looks complete and a failed
write leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["partial_path", "atomic_output"]


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


# What open() would give a new file; some writers (safetensors) create theirs 0600.
_FILE_MODE = 0o666 & ~_read_umask()


def partial_path(path: Path) -> Path:
    """Hidden sibling that keeps the format suffixes (``a.ome.tif`` -> ``.a.partial.ome.tif``).

    Some writers choose the format from the suffix (nibabel) or insist on it (AOTInductor's .pt2).
    """
    stem, dot, suffixes = path.name.partition(".")
    return path.with_name(f".{stem}.partial{dot}{suffixes}")


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a partial path to write; on success rename it to ``path``, on any error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)
