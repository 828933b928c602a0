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
           "automatic_threshold", "GLASS_MEDIAN_MAX", "max_detection_mpp", "otsu_threshold", "saturation",
           "tissue_mask"]

MIN_SATURATION = 15  # Otsu on an all-glass image still splits noise; never call saturation <= 15 tissue
# Glass (with its dust and out-of-focus haze) has a low saturation: when the pixels below Otsu's threshold
# have a median above this, the image has no glass and Otsu split tissue from tissue (pale stroma from
# dense nuclei, or two differently stained regions): every pixel above MIN_SATURATION is tissue then.
# Measured: the bundled sample's lower class has median 12 (glass); four MoNuSeg tiles, all tissue,
# 39-122; a 2 x 2 mosaic of them 77 (Otsu had dropped 10 of its 25 tiles).
GLASS_MEDIAN_MAX = 25
DEFAULT_MIN_AREA_UM2 = 2500.0  # 50 x 50 um: far below a needle-biopsy section or a TMA core (~0.3 mm^2)
MIN_OBJECT_PIXELS = 25  # an object of the minimum area spans >= 5 x 5 px, so it survives the 3 x 3 opening
FALLBACK_OBJECT_FRACTION = 1e-3  # size filter when the resolution is unknown: a fraction of the image
OPEN_SIDE = 3  # opening footprint (square): removes dust and isolated saturated pixels
CLOSE_SIDE = 9  # closing footprint (square) = the two 5 x 5 closings of the original detector
SATURATION_ROWS = 256  # thumbnail rows per step of the saturation computation
# Component labels are int32 (4 bytes per thumbnail pixel, not scikit-image's 8): the labelling of a
# 6250^2 thumbnail (a 100000^2 slide at 0.25 um/px) was the run's largest allocation.
LABEL_DTYPE = np.int32


def max_detection_mpp(min_area_um2: float) -> float:
    """Coarsest um/px at which an object of ``min_area_um2`` still covers MIN_OBJECT_PIXELS pixels."""
    return math.sqrt(min_area_um2 / MIN_OBJECT_PIXELS)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an RGB uint8 image, as uint8 0..255 (computed SATURATION_ROWS rows at a time,
    so the uint16 temporaries of a 40 Mpx thumbnail never exist whole)."""
    out = np.empty(rgb.shape[:2], dtype=np.uint8)
    for r in range(0, rgb.shape[0], SATURATION_ROWS):
        part = rgb[r:r + SATURATION_ROWS]
        mx, mn = part.max(axis=2), part.min(axis=2)
        spread = (mx - mn).astype(np.uint16) * 255  # 0 where mx == 0, so the division below needs no mask
        out[r:r + SATURATION_ROWS] = spread // np.maximum(mx, 1)
    return out


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values: ``values > threshold`` is the upper class (0 if uniform)."""
    if values.size == 0 or values.min() == values.max():
        return float(values.min()) if values.size else 0.0
    from skimage.filters import threshold_otsu  # scikit-image is imported lazily: the CLI imports this module

    hist = _counts(values, 256)
    return float(threshold_otsu(hist=(hist, np.arange(hist.size))))


def _counts(values: np.ndarray, minlength: int) -> np.ndarray:
    """``np.bincount`` of a 2-D integer image, SATURATION_ROWS rows at a time: bincount converts its
    input to int64, which for a whole 40 Mpx thumbnail is a 300 MB copy."""
    counts = np.zeros(minlength, dtype=np.int64)
    for r in range(0, values.shape[0], SATURATION_ROWS):
        part = np.bincount(values[r:r + SATURATION_ROWS].ravel(), minlength=minlength)
        if part.size > counts.size:
            counts = np.concatenate([counts, np.zeros(part.size - counts.size, dtype=np.int64)])
        counts[:part.size] += part
    return counts


def automatic_threshold(sat: np.ndarray) -> float:
    """Otsu's threshold of the saturation, at least MIN_SATURATION, unless the class below it is not
    glass (:data:`GLASS_MEDIAN_MAX`): then MIN_SATURATION, so an image without glass is all tissue."""
    otsu = otsu_threshold(sat)
    lower = sat[sat <= otsu]
    if lower.size and float(np.median(lower)) > GLASS_MEDIAN_MAX:
        return float(MIN_SATURATION)
    return max(otsu, float(MIN_SATURATION))


def tissue_mask(rgb: np.ndarray, threshold: float | None = None, min_object_px: float | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail.

    ``threshold``: saturation (0-255) above which a pixel is tissue; None = :func:`automatic_threshold`
    (Otsu's, at least MIN_SATURATION, or MIN_SATURATION for an image without glass).
    ``min_object_px``: smallest kept object in thumbnail pixels; None = a
    FALLBACK_OBJECT_FRACTION of the image (used only when the resolution is unknown).
    """
    from skimage.morphology import closing, footprint_rectangle, opening

    sat = saturation(rgb)
    thr = automatic_threshold(sat) if threshold is None else float(threshold)
    mask = sat > thr
    # mode="min": outside the image is background, as in the original scipy implementation
    mask = opening(mask, footprint_rectangle((OPEN_SIDE, OPEN_SIDE), decomposition="separable"), mode="min")
    mask = closing(mask, footprint_rectangle((CLOSE_SIDE, CLOSE_SIDE), decomposition="separable"), mode="min")
    mask = _fill_holes(mask)
    if min_object_px is None:
        min_object_px = FALLBACK_OBJECT_FRACTION * mask.size
    smallest = max(1, math.ceil(min_object_px))
    return _keep_large(mask, smallest) if smallest > 1 else mask


def _labels(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of ``mask`` as LABEL_DTYPE (0 = not in ``mask``)."""
    from scipy import ndimage as ndi

    labels = np.empty(mask.shape, dtype=LABEL_DTYPE)
    ndi.label(mask, output=labels)  # the default structure of a 2-D image is the 4-connected cross
    return labels


def _keep_large(mask: np.ndarray, smallest: int) -> np.ndarray:
    """``mask`` without its 4-connected objects of fewer than ``smallest`` pixels (what scikit-image's
    ``remove_small_objects(max_size=smallest - 1, connectivity=1)`` does, with int32 labels)."""
    labels = _labels(mask)
    keep = _counts(labels, int(labels.max()) + 1) >= smallest
    keep[0] = False
    return keep[labels]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected (4-connectivity) to the image border, as
    ``scipy.ndimage.binary_fill_holes`` does, by one labelling pass instead of iterated dilations."""
    background = _labels(~mask)
    edge = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
    hole = np.ones(int(background.max()) + 1, dtype=bool)  # per background label: enclosed by tissue?
    hole[edge] = False
    hole[0] = True  # label 0 is the tissue itself
    return hole[background]


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
