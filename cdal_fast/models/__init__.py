"""Models shipped inside the package (no download): each task's models (:mod:`cdal_fast.tasks`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..tasks import TASKS, get_task
from ..weights import ModelBundle, WeightsError, load_weights, weights_paths

__all__ = ["MODEL_DIR", "SHIPPED", "MAX_FILE_BYTES", "MAX_MODEL_BYTES", "default_weights", "load_model"]

MODEL_DIR = Path(__file__).resolve().parent
# shipped model name -> its task
SHIPPED = {model: task.name for task in TASKS.values() for model in task.models}
# Keeps the package light: each shipped file at most 16 MiB, each model at most 32 MiB in all.
MAX_FILE_BYTES = 16 * 2**20
MAX_MODEL_BYTES = 32 * 2**20


def default_weights(task: str = "monuseg", model: str | None = None) -> Path:
    """Path (without extension) of shipped ``model`` (default: ``task``'s default model)."""
    try:
        name = model or get_task(task).default_model
    except ValueError as exc:
        raise WeightsError(f"no shipped model for task {task!r} ({exc})") from None
    if name not in SHIPPED:
        raise WeightsError(f"no shipped model {name!r}; choose one of {', '.join(SHIPPED)}")
    path = MODEL_DIR / name
    if not weights_paths(path)[0].is_file():
        raise WeightsError(
            f"the {name!r} model is not shipped in this version of cdal-fast; pass --weights "
            "with a weights file trained by `cdal-fast train`"
        )
    return path


def load_model(weights: str | Path | None = None, task: str = "monuseg",
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               model: str | None = None) -> ModelBundle:
    """Load ``weights`` or, when None, shipped ``model`` (default: the default model of ``task``)."""
    return load_weights(weights if weights is not None else default_weights(task, model), device, dtype)
