"""Decision threshold and binary-mask clean-up of a binary model (issue 24, lever 5).

A binary model's mask is ``P(object) >= threshold``; the clean-up then fills background holes of at
most ``fill_holes_px`` pixels (a hole: a 4-connected background region that does not touch the
border) and removes 8-connected objects smaller than ``min_object_px`` pixels. Sizes are in pixels
of the model's own grid (its ``mpp``; the 512 working grid of the MoNuSeg protocol is that grid), so
one setting means the same physical size in ``eval`` and ``segment``.

The defaults (0.5, 0, 0) are the plain decoding of :func:`cdal_fast.sampling.decode.to_labels`. Only the
threshold became a model default (``ModelConfig.threshold``, decoded by :mod:`cdal_fast.sampling.decode` in
``segment`` and ``eval``); the clean-up sizes added <= 0.0008 validation Dice and are used only by the
offline sweep (``scripts/tune_monuseg_val.py``), so no config carries them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .decode import BINARY_THRESHOLD

__all__ = ["PostProcess", "postprocess_mask"]

FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
EIGHT_CONNECTED = ndimage.generate_binary_structure(2, 2)


@dataclass(frozen=True)
class PostProcess:
    """Threshold on P(object) and the two clean-up sizes (0 turns a clean-up off)."""

    threshold: float = BINARY_THRESHOLD
    fill_holes_px: int = 0
    min_object_px: int = 0


def _component_sizes(mask: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, count = ndimage.label(mask, structure=structure)
    return labels, np.bincount(labels.ravel(), minlength=count + 1)


def postprocess_mask(mask: np.ndarray, post: PostProcess) -> np.ndarray:
    """The cleaned boolean mask (H, W): small holes filled first, then small objects removed."""
    if mask.ndim != 2:
        raise ValueError(f"post-processing works on one 2D mask, got shape {mask.shape}")
    out = np.asarray(mask, dtype=bool).copy()
    if post.fill_holes_px > 0:
        labels, sizes = _component_sizes(~out, FOUR_CONNECTED)
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        small = sizes <= post.fill_holes_px
        small[0] = False  # label 0 is the foreground
        small[border] = False  # background reaching the border is not a hole
        out |= small[labels]
    if post.min_object_px > 0:
        labels, sizes = _component_sizes(out, EIGHT_CONNECTED)
        keep = sizes >= post.min_object_px
        keep[0] = False
        out = keep[labels]
    return out
