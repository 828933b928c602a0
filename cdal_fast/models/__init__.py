"""Models shipped inside the package (no download): one weights pair per task."""

from __future__ import annotations

from pathlib import Path

import torch

from ..weights import ModelBundle, WeightsError, load_weights, weights_paths

__all__ = ["MODEL_DIR", "SHIPPED", "MAX_FILE_BYTES", "MAX_MODEL_BYTES", "default_weights", "load_model"]

MODEL_DIR = Path(__file__).resolve().parent
SHIPPED = {"monuseg": "monuseg", "cxr": "cxr", "hippocampus": "hippocampus"}
# Keeps the package light: each shipped file at most 16 MiB, each model at most 32 MiB in all.
MAX_FILE_BYTES = 16 * 2**20
MAX_MODEL_BYTES = 32 * 2**20


def default_weights(task: str = "monuseg") -> Path:
    """Path (without extension) of the shipped model for ``task``."""
    if task not in SHIPPED:
        raise WeightsError(f"no shipped model for task {task!r}; choose one of {', '.join(SHIPPED)}")
    path = MODEL_DIR / SHIPPED[task]
    if not weights_paths(path)[0].is_file():
        raise WeightsError(
            f"the {task!r} model is not shipped in this version of cdal-fast; pass --weights "
            "with a weights file trained by `cdal-fast train`"
        )
    return path


def load_model(weights: str | Path | None = None, task: str = "monuseg",
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load ``weights`` or, when None, the shipped model of ``task``."""
    return load_weights(weights if weights is not None else default_weights(task), device, dtype)
