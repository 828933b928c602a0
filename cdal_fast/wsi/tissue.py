"""Tissue detection on a low-resolution image: Otsu threshold on saturation, then clean-up.

H&E tissue is coloured (saturated) while glass, background and most pen-free margins are grey or
white, so a global Otsu threshold on the HSV saturation separates them; morphological opening
removes dust, closing and hole filling keep lumens and fat inside the tissue.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["otsu_threshold", "tissue_mask"]


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8-like values (0..255)."""
    hist = np.bincount(np.clip(values.ravel(), 0, 255).astype(np.int64), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between[~np.isfinite(between)] = 0
    return float(np.argmax(between))


def tissue_mask(rgb: np.ndarray, min_saturation: int = 15, min_object_fraction: float = 1e-3) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail."""
    rgb = rgb.astype(np.int16)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) * 255 // np.maximum(mx, 1), 0).astype(np.uint8)
    thr = max(otsu_threshold(sat), float(min_saturation))
    mask = sat > thr
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3)), iterations=1)
    mask = ndimage.binary_closing(mask, structure=np.ones((5, 5)), iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, dtype=bool)
        keep[1:] = sizes >= max(1.0, min_object_fraction * mask.size)
        mask = keep[labels]
    return mask
