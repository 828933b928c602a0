"""The user cache folder: exported sampler graphs, TensorRT engines, C++ ops compiled on first use.

A module of its own, free of everything but the standard library, so that the op loader
(:mod:`cdal_fast.network.op_library`) and the sampler runtimes (:mod:`cdal_fast.runtime.onnx_cache`)
share one rule without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir"]

CACHE_ENV = "CDAL_FAST_CACHE"


def cache_dir() -> Path:
    """``$CDAL_FAST_CACHE``, else ``$XDG_CACHE_HOME/cdal-fast``, else ``~/.cache/cdal-fast`` (not created here)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cdal-fast")
    return Path(root)
