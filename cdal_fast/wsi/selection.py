"""Which tiles to sample and which output pixels to keep: tissue mask, region of interest, or both.

Planning works on coarse masks (the tissue thumbnail, or the ROI rasterised at a few pixels per
tile) and keeps every tile whose footprint touches the mask. After stitching, outputs outside the
ROI are cleared band by band at the working resolution, so memory stays bounded by one band.
"""

from __future__ import annotations

import math

import numpy as np

from ..decode import MaskKind, object_pixels
from .roi import Roi
from .tiling import Tile, TileGrid

__all__ = ["tiles_touching", "roi_planning_mask", "clear_outside_roi", "ROI_CELLS_PER_TILE", "CLEAR_BAND_ROWS"]

ROI_CELLS_PER_TILE = 4  # without a tissue thumbnail the ROI is rasterised at 4 x 4 cells per tile
CLEAR_BAND_ROWS = 1024  # working rows per band when clearing outside the ROI


def tiles_touching(mask: np.ndarray, downsample: float, work_to_level0: float, grid: TileGrid) -> list[Tile]:
    """Tiles whose footprint touches ``mask`` (bool, ``downsample`` level-0 px per mask px), with a
    one-pixel margin so rounding at the mask's coarse scale never drops an edge tile.
    ``work_to_level0``: level-0 pixels per working pixel."""
    f = work_to_level0 / downsample  # working px -> mask px
    tiles = grid.tiles()
    if not tiles:
        return []
    h, w = mask.shape
    ys = np.array([t.y for t in tiles], dtype=np.float64)
    xs = np.array([t.x for t in tiles], dtype=np.float64)
    y0 = np.clip((ys * f).astype(np.int64) - 1, 0, h)
    x0 = np.clip((xs * f).astype(np.int64) - 1, 0, w)
    y1 = np.clip(np.ceil((ys + grid.tile) * f).astype(np.int64) + 1, 0, h)
    x1 = np.clip(np.ceil((xs + grid.tile) * f).astype(np.int64) + 1, 0, w)
    # an integral image answers "any mask pixel in this box" for every tile at once
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = mask.cumsum(0, dtype=np.int64).cumsum(1)
    count = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return [t for t, c in zip(tiles, count) if c > 0]


def roi_planning_mask(roi: Roi, tissue_mask: np.ndarray | None, tissue_downsample: float, slide_h: int,
                      slide_w: int, work_to_level0: float, tile: int) -> tuple[np.ndarray, float]:
    """The planning mask with the ROI applied, and its downsample: tissue AND the ROI (every pixel the
    ROI touches) at the thumbnail scale, or the ROI alone when tissue detection is off."""
    if tissue_mask is not None:
        h, w = tissue_mask.shape
        return tissue_mask & roi.rasterise(h, w, tissue_downsample, all_touched=True), tissue_downsample
    down = work_to_level0 * tile / ROI_CELLS_PER_TILE
    h, w = max(1, math.ceil(slide_h / down)), max(1, math.ceil(slide_w / down))
    return roi.rasterise(h, w, down, all_touched=True), down


def clear_outside_roi(roi: Roi, work_to_level0: float, maps: list[np.ndarray], kind: MaskKind) -> int:
    """Zero every map outside the ROI (pixel centres); returns the object pixels left in ``maps[0]``
    (the encoded probability/label map, counted by :func:`cdal_fast.decode.object_pixels`)."""
    height, width = maps[0].shape[:2]
    objects = 0
    for row0 in range(0, height, CLEAR_BAND_ROWS):
        rows = min(CLEAR_BAND_ROWS, height - row0)
        outside = ~roi.rasterise(rows, width, work_to_level0, row0=row0)
        for m in maps:
            band = np.asarray(m[row0:row0 + rows])
            band[outside] = 0
            m[row0:row0 + rows] = band
        first = np.asarray(maps[0][row0:row0 + rows])
        objects += object_pixels(first, kind)
    return objects
