"""Tissue detection on a low-resolution image: Otsu threshold on saturation, then clean-up.

H&E tissue is coloured (saturated) while glass, background and most pen-free margins are grey or
white, so a global Otsu threshold on the HSV saturation separates them; morphological opening
removes dust, closing and hole filling keep lumens and fat inside the tissue, and objects smaller
than the minimum tissue area are dropped.

The minimum area is physical (um^2), so the detector must look at a resolution where an object
of that area still spans enough pixels to survive the opening: :func:`max_detection_mpp` gives the
coarsest usable resolution and the pipeline reads its thumbnail at that scale or finer. (A
thumbnail of fixed pixel size made 250 um fragments on a 25 mm slide a few pixels wide, and a
size filter relative to the thumbnail then removed them.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .readers import SlideReader

__all__ = ["DEFAULT_MIN_AREA_UM2", "TissueDetection", "detect_tissue", "MIN_SATURATION", "MIN_OBJECT_PIXELS",
           "max_detection_mpp", "otsu_threshold", "saturation", "tissue_mask"]

MIN_SATURATION = 15  # Otsu on an all-glass image still splits noise; never call saturation <= 15 tissue
DEFAULT_MIN_AREA_UM2 = 2500.0  # 50 x 50 um: far below a needle-biopsy section or a TMA core (~0.3 mm^2)
MIN_OBJECT_PIXELS = 25  # an object of the minimum area spans >= 5 x 5 px, so it survives the 3 x 3 opening
FALLBACK_OBJECT_FRACTION = 1e-3  # size filter when the resolution is unknown: a fraction of the image
OPEN_SIDE = 3  # opening footprint (square): removes dust and isolated saturated pixels
CLOSE_SIDE = 9  # closing footprint (square) = the two 5 x 5 closings of the original detector


def max_detection_mpp(min_area_um2: float) -> float:
    """Coarsest um/px at which an object of ``min_area_um2`` still covers MIN_OBJECT_PIXELS pixels."""
    return math.sqrt(min_area_um2 / MIN_OBJECT_PIXELS)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an RGB uint8 image, as uint8 0..255."""
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    spread = (mx - mn).astype(np.uint16) * 255  # 0 where mx == 0, so the division below needs no mask
    return (spread // np.maximum(mx, 1)).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values: ``values > threshold`` is the upper class (0 if uniform)."""
    if values.size == 0 or values.min() == values.max():
        return float(values.min()) if values.size else 0.0
    from skimage.filters import threshold_otsu  # scikit-image is imported lazily: the CLI imports this module

    hist = np.bincount(values.ravel().astype(np.int64), minlength=256)
    return float(threshold_otsu(hist=(hist, np.arange(hist.size))))


def tissue_mask(rgb: np.ndarray, threshold: float | None = None, min_object_px: float | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail.

    ``threshold``: saturation (0-255) above which a pixel is tissue; None = Otsu's threshold, but at
    least MIN_SATURATION. ``min_object_px``: smallest kept object in thumbnail pixels; None = a
    FALLBACK_OBJECT_FRACTION of the image (used only when the resolution is unknown).
    """
    from skimage.morphology import closing, footprint_rectangle, opening, remove_small_objects

    sat = saturation(rgb)
    thr = max(otsu_threshold(sat), float(MIN_SATURATION)) if threshold is None else float(threshold)
    mask = sat > thr
    # mode="min": outside the image is background, as in the original scipy implementation
    mask = opening(mask, footprint_rectangle((OPEN_SIDE, OPEN_SIDE), decomposition="separable"), mode="min")
    mask = closing(mask, footprint_rectangle((CLOSE_SIDE, CLOSE_SIDE), decomposition="separable"), mode="min")
    mask = _fill_holes(mask)
    if min_object_px is None:
        min_object_px = FALLBACK_OBJECT_FRACTION * mask.size
    smallest = max(1, math.ceil(min_object_px))
    return remove_small_objects(mask, max_size=smallest - 1, connectivity=1) if smallest > 1 else mask



def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected (4-connectivity) to the image border, as
    ``scipy.ndimage.binary_fill_holes`` does, by one labelling pass instead of iterated dilations."""
    from skimage.measure import label

    background = label(~mask, connectivity=1)
    edge = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
    return ~np.isin(background, edge[edge > 0])


@dataclass
class TissueDetection:
    """The tissue mask a run used, at the scale it was detected (saved with ``--save-tissue``)."""

    mask: np.ndarray  # bool, thumbnail pixels
    thumb: np.ndarray  # the RGB thumbnail it was detected on
    downsample: float  # level-0 pixels per thumbnail pixel
    mpp: float  # um per thumbnail pixel
    threshold: float | None
    min_area_um2: float


def detect_tissue(reader: SlideReader, mpp0: float, thumbnail_side: int = 2048, threshold: float | None = None,
                  min_area_um2: float = DEFAULT_MIN_AREA_UM2) -> TissueDetection:
    """Tissue of ``reader`` (level-0 resolution ``mpp0`` um/px) on a thumbnail fine enough for
    objects of ``min_area_um2`` to survive the clean-up."""
    if min_area_um2 <= 0:
        raise ValueError(f"minimum tissue area must be > 0 um^2, got {min_area_um2}")
    if threshold is not None and not 0 <= threshold < 255:
        raise ValueError(f"tissue threshold must be a saturation in [0, 255), got {threshold}")
    thumb, down = reader.thumbnail(thumbnail_side, max_downsample=max_detection_mpp(min_area_um2) / mpp0)
    mpp = mpp0 * down
    mask = tissue_mask(thumb, threshold, min_object_px=min_area_um2 / mpp**2)
    return TissueDetection(mask, thumb, down, mpp, threshold, min_area_um2)
