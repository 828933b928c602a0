"""Which tiles to sample and which output pixels to keep: tissue mask, region of interest, or both.

Planning works on coarse masks (the tissue thumbnail, or the ROI rasterised at a few pixels per
tile) and keeps every tile whose footprint touches the mask. After stitching, outputs outside the
ROI are cleared band by band at the working resolution, so memory stays bounded by one band.
"""

from __future__ import annotations

import math

import numpy as np

from ..sampling.decode import MaskKind, object_pixels
from .roi import Roi
from .tiling import Tile, TileGrid

__all__ = ["tiles_touching", "roi_planning_mask", "clear_outside_roi", "ROI_CELLS_PER_TILE", "CLEAR_BAND_ROWS"]

ROI_CELLS_PER_TILE = 4  # without a tissue thumbnail the ROI is rasterised at 4 x 4 cells per tile
CLEAR_BAND_ROWS = 1024  # working rows per band when clearing outside the ROI


def tiles_touching(mask: np.ndarray, downsample: float, work_to_level0: float, grid: TileGrid) -> list[Tile]:
    """Tiles whose footprint touches ``mask`` (bool, ``downsample`` level-0 px per mask px), with a
    one-pixel margin so rounding at the mask's coarse scale never drops an edge tile.
    ``work_to_level0``: level-0 pixels per working pixel.

    Works one tile row at a time (the mask rows it spans, reduced to one flag per mask column, and a
    1-D prefix sum), so memory is a few mask rows and the kept tiles, not the whole grid.
    """
    f = work_to_level0 / downsample  # working px -> mask px
    h, w = mask.shape
    xs = np.asarray(grid.xs, dtype=np.float64)
    x0 = np.clip((xs * f).astype(np.int64) - 1, 0, w)
    x1 = np.clip(np.ceil((xs + grid.tile) * f).astype(np.int64) + 1, 0, w)
    kept: list[Tile] = []
    for row, y in enumerate(grid.ys):
        y0 = min(max(int(y * f) - 1, 0), h)
        y1 = min(max(math.ceil((y + grid.tile) * f) + 1, 0), h)
        if y1 <= y0:
            continue
        prefix = np.zeros(w + 1, dtype=np.int64)
        np.cumsum(mask[y0:y1].any(axis=0), out=prefix[1:])
        hit = np.flatnonzero(prefix[x1] - prefix[x0] > 0)
        if hit.size:
            tiles = grid.row_tiles(row)
            kept.extend(tiles[c] for c in hit)
    return kept


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
    (the encoded probability/label map, counted by :func:`cdal_fast.sampling.decode.object_pixels`)."""
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
