"""A slide's own stains: the per-slide Macenko estimate, and its RGB rows at the working scale.

* :func:`estimate_slide_stains` (stage 1, when ``--stain-vectors estimate`` or ``--stain-normalise``
  asks for it): the stain vectors and concentration scale of the slide, estimated from the pooled
  pixels of up to :data:`ESTIMATE_TILES` of the tiles that will be sampled (evenly spaced in tile
  order, read at the pyramid level the tiles are read from), so background and pen outside the
  tissue do not enter. On failure (too little stain) the caller falls back and warns.
* :class:`WorkingRows` (stage 5): the slide's RGB for rows ``[y, y + n)`` and columns ``[c0, c1)``
  of the working grid (the stitched maps' grid), read through the slide reader and resampled the
  way tiles are (bilinear with antialiasing when the level is finer), a few thousand columns at a
  time, so the nucleus step can measure stains under each nucleus with one band of RGB in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..nuclei.stain import StainEstimationError, StainProfile, estimate_macenko
from .readers import open_slide
from .tiling import Tile

__all__ = ["ESTIMATE_TILES", "estimation_tiles", "estimate_slide_stains", "WorkingRows"]

ESTIMATE_TILES = 16
READ_COLUMNS = 4096  # working columns per read (bounds the level region held at once)


def estimation_tiles(tiles: list[Tile], count: int = ESTIMATE_TILES) -> list[Tile]:
    """Up to ``count`` tiles spread evenly over ``tiles`` (first and last included)."""
    if len(tiles) <= count:
        return list(tiles)
    picks = np.linspace(0, len(tiles) - 1, count).round().astype(int)
    return [tiles[i] for i in sorted(set(picks.tolist()))]


def estimate_slide_stains(read_tile: Callable[[Tile], np.ndarray], tiles: list[Tile],
                          kind: str) -> tuple[StainProfile | None, str | None]:
    """(profile, None), or (None, warning) when the sampled tiles hold too little stain to estimate from."""
    picked = estimation_tiles(tiles)
    if not picked:
        return None, "stain vectors could not be estimated: no tile is sampled"
    pixels = np.concatenate([read_tile(t).reshape(-1, 3) for t in picked])
    try:
        return estimate_macenko(pixels, kind), None
    except StainEstimationError as exc:
        return None, f"stain vectors could not be estimated from {len(picked)} sampled tiles ({exc})"


class WorkingRows:
    """RGB rows of a slide on the working grid (``level`` read, ``level_scale`` level px per working px)."""

    def __init__(self, path: Path, level: int, level_scale: float) -> None:
        self._reader = open_slide(path)
        self.level, self.scale = level, float(level_scale)

    def read(self, y: int, n: int, c0: int, c1: int) -> np.ndarray:
        """uint8 (n, c1 - c0, 3): working rows [y, y + n), columns [c0, c1)."""
        out = np.empty((n, c1 - c0, 3), np.uint8)
        for a in range(c0, c1, READ_COLUMNS):
            b = min(c1, a + READ_COLUMNS)
            out[:, a - c0:b - c0] = self._read_block(y, n, a, b)
        return out

    def _read_block(self, y: int, n: int, c0: int, c1: int) -> np.ndarray:
        s = self.scale
        fx0, fy0, fx1, fy1 = c0 * s, y * s, c1 * s, (y + n) * s
        x0, y0 = int(math.floor(fx0)), int(math.floor(fy0))
        x1, y1 = int(math.ceil(fx1 - 1e-9)), int(math.ceil(fy1 - 1e-9))
        region = self._reader.read_region(self.level, x0, y0, max(1, x1 - x0), max(1, y1 - y0))
        if region.shape[:2] == (n, c1 - c0) and fx0 == x0 and fy0 == y0:
            return region  # the level is the working grid here: no resampling
        from PIL import Image

        box = (fx0 - x0, fy0 - y0, fx1 - x0, fy1 - y0)
        return np.asarray(Image.fromarray(region).resize((c1 - c0, n), Image.BILINEAR, box=box))

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> WorkingRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
