"""A model's stain-normalisation reference: ``NAME.stain.json`` beside ``NAME.safetensors``.

Written once per model by ``scripts/stain_reference.py`` (a Macenko estimate of the training tiles'
pooled pixels); read by ``segment --stain-normalise`` (through the job layer) and
``eval --stain-normalise``. Not part of the weights' hashes: the file is small, plain JSON and
checked field by field when read (:class:`cdal_fast.nuclei.stain.StainProfile`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .nuclei.stain import StainProfile
from .weights import base_name

__all__ = ["STAIN_SUFFIX", "StainReferenceError", "stain_reference_path", "load_stain_reference"]

STAIN_SUFFIX = ".stain.json"
FORMAT = "cdal-fast-stain-reference"


class StainReferenceError(ValueError):
    """The model has no usable stain reference."""


def stain_reference_path(weights: str | Path) -> Path:
    """``NAME.stain.json`` for weights ``NAME`` / ``NAME.safetensors`` / ``NAME.json``."""
    p = base_name(Path(weights))  # the weights' own naming rule
    return p.with_name(p.name + STAIN_SUFFIX)


def load_stain_reference(weights: str | Path) -> StainProfile:
    """The reference profile stored with ``weights``; a clear error when it is missing or malformed."""
    path = stain_reference_path(weights)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise StainReferenceError(
            f"the model {Path(weights).name} has no stain reference ({path} is missing); estimate one from its "
            "training tiles with scripts/stain_reference.py --out " + str(path)) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise StainReferenceError(f"{path}: not a readable stain reference ({exc})") from None
    try:
        if record.get("format") != FORMAT:
            raise ValueError(f"format is {record.get('format')!r}, not {FORMAT!r}")
        profile = StainProfile.from_dict(record["profile"])
        if profile.max_concentrations is None:
            raise ValueError("max_concentrations are missing")
        return profile
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise StainReferenceError(f"{path}: not a usable stain reference ({exc})") from None
