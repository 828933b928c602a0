"""Marker-controlled watershed: vote-mean probability -> nucleus instance labels.

Foreground is ``prob >= threshold`` with holes filled (nuclei have none). Markers are the extended
(h-)maxima of the Euclidean distance transform (in um, so h is resolution-free); the watershed
floods ``-distance`` inside the foreground, splitting touching nuclei along the distance saddles. A
foreground component without a marker (narrower than h) stays one object. Objects below the
minimum area are dropped. The vote spread is not used for splitting (it is a measurement).

Every step runs on one 8-connected foreground component at a time, cropped to its bounding box
plus one pixel (the distance to background, the maxima, the flooding and the area filter see only
the component and the background around it). :class:`cdal_fast.nuclei.bands.BandLabeller` relies
on this: a component labelled whole in a band gets exactly the labels a whole-slide labelling
would give.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import local_maxima, reconstruction
from skimage.segmentation import watershed

from .params import NucleiParams

__all__ = ["EIGHT_CONNECTED", "foreground", "label_nuclei", "min_area_px"]

EIGHT_CONNECTED = np.ones((3, 3), bool)


def min_area_px(params: NucleiParams, mpp: float) -> int:
    """The minimum object area in pixels of side ``mpp`` um (rounded up, at least 1)."""
    return max(1, int(np.ceil(params.min_area_um2 / (mpp * mpp) - 1e-9)))


def foreground(prob: np.ndarray, params: NucleiParams) -> np.ndarray:
    """Thresholded probability with holes filled (a hole is background enclosed by one component)."""
    return ndi.binary_fill_holes(prob >= params.prob_threshold)


def label_nuclei(prob: np.ndarray, params: NucleiParams, mpp: float) -> np.ndarray:
    """int32 instance labels (0 = background, 1..N) of a 2D probability map with pixels of ``mpp`` um."""
    if prob.ndim != 2:
        raise ValueError(f"label_nuclei needs a 2D probability map, got shape {prob.shape}")
    if not mpp > 0:
        raise ValueError(f"label_nuclei needs a positive pixel size in um, got mpp={mpp!r}")
    comps, _ = ndi.label(foreground(prob, params), structure=EIGHT_CONNECTED)
    labels = np.zeros(prob.shape, np.int32)
    min_px = min_area_px(params, mpp)
    n_done = 0
    for k, box in enumerate(ndi.find_objects(comps), start=1):
        if box is None:
            continue
        box = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(box, prob.shape))
        parts = _split_component(comps[box] == k, params, mpp, min_px)
        inside = parts > 0
        labels[box][inside] = parts[inside] + n_done
        n_done += int(parts.max())
    return _relabel(labels)


def extended_maxima(dist: np.ndarray, h: float) -> np.ndarray:
    """Regional maxima of the h-maxima transform (reconstruction by dilation of ``dist - h`` under ``dist``).

    Peaks joined by a saddle less than h below them merge into one plateau and so one marker, even
    when they are equally high (``skimage.morphology.h_maxima`` would keep both tips as separate
    maxima then, and two equal nuclei-halves would always be split).
    """
    if h >= float(dist.max()):
        return np.zeros(dist.shape, bool)  # no peak rises h above the background
    rec = reconstruction(np.maximum(dist - h, 0.0), dist, method="dilation")
    return local_maxima(rec, connectivity=2, allow_borders=True) & (dist > 0)


def _split_component(mask: np.ndarray, params: NucleiParams, mpp: float, min_px: int) -> np.ndarray:
    """Watershed of one component's crop (its bounding box plus one pixel of background).

    Run per component, not on the whole map, because the watershed's tie-breaking between equal
    heights follows the global pixel order: on the whole map a one-pixel boundary between two
    nuclei could move with unrelated objects elsewhere, and band results would differ from
    whole-image results.
    """
    dist = ndi.distance_transform_edt(mask, sampling=mpp)
    markers, n_markers = ndi.label(extended_maxima(dist, params.marker_h_um), structure=EIGHT_CONNECTED)
    parts = watershed(-dist, markers, mask=mask) if n_markers else np.zeros(mask.shape, np.int32)
    # Pieces no marker reaches (a component thinner than h, a diagonal-only appendix) stay whole.
    orphans, _ = ndi.label(mask & (parts == 0), structure=EIGHT_CONNECTED)
    parts = np.where(orphans > 0, orphans + n_markers, parts).astype(np.int32)
    parts[(np.bincount(parts.ravel()) < min_px)[parts]] = 0
    return _relabel(parts)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive labels 1..N in raster order of each object's first pixel (deterministic ids)."""
    if not labels.any():
        return np.zeros(labels.shape, np.int32)
    flat = labels.ravel()
    uniq, first = np.unique(flat, return_index=True)
    keep = uniq != 0
    order = uniq[keep][np.argsort(first[keep], kind="stable")]
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[order] = np.arange(1, order.size + 1, dtype=np.int32)
    return lut[labels]
