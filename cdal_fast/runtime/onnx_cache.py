"""The ONNX graph cache: each sampler graph is exported once per verified weights, T, V, tile size,
precision and TTA, and reused by ``--backend onnx`` / ``tensorrt`` (and ``auto`` on a CPU).

The cache key is the SHA-256 that ``load_weights`` verified, never a name a JSON file gives: the
file name holds a sanitised preset name only for people reading the folder. Unverified weights get
a graph private to the process (``unverified/HOST/...-pidN-...``), deleted by later runs of this
host once the process has ended.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path

from ..cache import cache_dir
from ..network.generator import Generator
from .onnx_export import GRAPH_FORMAT, export_onnx, onnx_metadata
from .requires import BackendError

__all__ = ["cache_dir", "cached_onnx", "remove_orphaned_graphs"]

_log = logging.getLogger(__name__)  # one-time work worth a line (the CLI shows cdal_fast's INFO on stderr)


_SAFE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_MAX_NAME_CHARS = 40  # of the preset name kept in a cache file name (the hash is the real key)
_HASH_TAG_CHARS = 32  # hex digits of the verified hash in the file name (128 bits)


def _safe_name(name: str) -> str:
    """``name`` reduced to letters, digits, ``_`` and ``-``: the preset name comes from an untrusted
    JSON, and ``../../x`` or ``a/b`` must not leave (or restructure) the cache folder."""
    cleaned = "".join(c if c in _SAFE_NAME_CHARS else "_" for c in name)[:_MAX_NAME_CHARS].strip("_")
    return cleaned or "model"


def _verified_tag(weights_sha256: str) -> str:
    """The cache key for a verified weights hash; "" when the value is not a SHA-256 at all."""
    digest = weights_sha256.lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return ""
    return digest[:_HASH_TAG_CHARS]


def _stale(path: Path) -> bool:
    """A cached graph written by an older exporter (another graph format) or unreadable: export again."""

    try:
        return onnx_metadata(path).get("cdal_graph_format") != GRAPH_FORMAT
    except Exception:  # a truncated or foreign file in the cache is replaced, not trusted
        return True


# The owner of a private (unverified-weights) graph file: the last "-pidN-T..." of its name (a preset
# name, which comes from a JSON file, may hold "-pid" itself).
UNVERIFIED_PID = re.compile(r".*-pid(\d+)-T\d+-V\d+-S\d+")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_orphaned_graphs(folder: Path) -> list[Path]:
    """Delete the private graphs of this host's processes that have ended (each unverified run exports
    its own, ~30 MB for the shipped model, and cannot delete it while its session may still read it).
    ``folder`` is this host's own (a cache on a shared filesystem is seen by processes of other
    machines, whose pids mean nothing here)."""
    removed = []
    for path in folder.glob("*-pid*-*.onnx*") if folder.is_dir() else ():
        match = UNVERIFIED_PID.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not _process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def cached_onnx(generator: Generator, steps: int | None, votes: int | None, weights_sha256: str,
                precision: str = "fp32", tta: bool = False) -> Path:
    """The sampler's ONNX graph for these weights, T and V, exported once into the cache.

    ``weights_sha256`` must be the hash ``load_weights`` verified (``ModelBundle.content_sha256``);
    only then is a cached graph reused. Without one (unverified weights, a bare generator) the
    graph is exported afresh into a file private to this process (under ``unverified/HOST/``) and
    never read from the cache; such files left by this host's processes that have ended are deleted
    on the way.
    The file name holds nothing but a sanitised preset name, the hash, T, V, the tile size and a
    precision suffix for reduced-precision graphs (TensorRT's strongly typed engines) and ``-tta``
    for a graph with test-time augmentation.
    """

    cfg = generator.cfg
    t, v = steps or cfg.num_steps, votes or cfg.votes
    tag = _verified_tag(weights_sha256)
    folder = cache_dir() / "onnx"
    shape = f"T{int(t)}-V{int(v)}-S{int(cfg.image_size)}" + ("" if precision == "fp32" else f"-{precision}")
    shape += "-tta" if tta else ""
    if tag:
        path = folder / f"{_safe_name(cfg.name)}-{tag}-{shape}.onnx"
    else:
        host = _safe_name(socket.gethostname())
        path = folder / "unverified" / host / f"{_safe_name(cfg.name)}-pid{os.getpid()}-{shape}.onnx"
    if path.resolve().parent != (folder / ("" if tag else f"unverified/{host}")).resolve():
        raise BackendError(f"ONNX cache file {path} would lie outside the cache folder {folder}")
    if not tag:
        remove_orphaned_graphs(path.parent)
    if not tag or not path.is_file() or _stale(path):
        t0 = time.monotonic()
        if tag:  # the one-time cost a user would otherwise wait through in silence (an unverified graph is private)
            _log.info("building the sampler graph for %s (T %d, V %d%s) once into %s; later runs reuse it",
                      cfg.name, t, v, ", TTA" if tta else "", folder)
        export_onnx(generator, path, t, v, weights_sha256=weights_sha256 if tag else "", precision=precision,
                    tta=tta)
        if tag:
            _log.info("sampler graph built in %.0f s", time.monotonic() - t0)
    return path
