"""Tile grid at the model's resolution and the blending window that hides tile borders.

Tiles are laid out row-major with stride ``tile - overlap``; the last row/column is shifted
back so every tile lies inside the slide (slides smaller than a tile get one padded tile).
Overlapping predictions are averaged with a separable window that is 1 in the tile centre and
falls smoothly (cosine ramp) across the overlap, reaching 0 before the tile edge, so no seam shows
where tiles meet and the network's padding-distorted edge pixels never reach the output.

A 100000^2 px slide has ~270000 tiles and almost all of them are background, so nothing here
builds per-tile lists of the whole grid: :meth:`TileGrid.row_tiles` enumerates one tile row, and
:class:`Coverage` records, on a coarse block grid, which working pixels the sampled tiles reach
(everything else of the stitched maps is known to be background without reading it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["Tile", "TileGrid", "Coverage", "COVERAGE_BLOCK", "blend_1d", "blend_window"]

COVERAGE_BLOCK = 64  # working px per coverage cell: 2.4 MB of flags for a 100000^2 working map


@dataclass(frozen=True)
class Tile:
    index: int
    row: int
    col: int
    y: int  # top-left corner in working-resolution pixels
    x: int


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


@dataclass
class TileGrid:
    height: int  # working-resolution image size
    width: int
    tile: int
    overlap: int

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"tile overlap must be in [0, {self.tile}), got {self.overlap}")
        stride = self.tile - self.overlap
        self.ys = _starts(self.height, self.tile, stride)
        self.xs = _starts(self.width, self.tile, stride)

    @property
    def rows(self) -> int:
        return len(self.ys)

    @property
    def cols(self) -> int:
        return len(self.xs)

    @property
    def count(self) -> int:
        """Number of tiles in the grid (without building them)."""
        return self.rows * self.cols

    def row_tiles(self, row: int) -> list[Tile]:
        """The tiles of one tile row, left to right."""
        y = self.ys[row]
        return [Tile(row * self.cols + c, row, c, y, x) for c, x in enumerate(self.xs)]

    def iter_tiles(self) -> Iterator[Tile]:
        """Every tile, row-major, one row built at a time."""
        for row in range(self.rows):
            yield from self.row_tiles(row)

    def tiles(self) -> list[Tile]:
        """Every tile as a list: only for grids that are sampled whole (memory grows with the slide)."""
        return list(self.iter_tiles())

    def row_end(self, row: int) -> int:
        """Working rows < this value receive no contribution from tile rows after ``row``."""
        return self.ys[row + 1] if row + 1 < self.rows else self.height


def blend_1d(tile: int, overlap: int, ramp_start: bool = True, ramp_end: bool = True) -> np.ndarray:
    """1D weights: 0 on the outer ``overlap // 4`` pixels (where zero padding distorts the network's
    output), a cosine ramp up to 1 across the rest of the overlap, 1 inside. Sides that touch the
    image boundary have no neighbour to blend with and keep weight 1."""
    w = np.ones(tile, dtype=np.float64)
    if overlap > 0:
        margin = overlap // 4
        t = (np.arange(overlap - margin) + 0.5) / (overlap - margin)
        ramp = np.concatenate([np.zeros(margin), 0.5 - 0.5 * np.cos(np.pi * t)])
        if ramp_start:
            w[:overlap] = ramp
        if ramp_end:
            w[tile - overlap:] = np.minimum(w[tile - overlap:], ramp[::-1])
    return w


def blend_window(tile: int, overlap: int, top: bool = True, bottom: bool = True, left: bool = True,
                 right: bool = True) -> np.ndarray:
    """(tile, tile) float32 weights; the flags say which sides have a neighbouring tile."""
    return np.outer(blend_1d(tile, overlap, top, bottom), blend_1d(tile, overlap, left, right)).astype(np.float32)


class Coverage:
    """Which working pixels the sampled tiles reach, on cells of ``block`` x ``block`` px.

    The stitcher writes 0 (background, no vote) wherever no sampled tile contributes, so a map region
    whose cells are all uncovered is background without reading it: the writers and the nucleus step
    skip it. The flags cost one byte per cell (2.4 MB for a 100000^2 working map at 64 px cells).
    """

    def __init__(self, height: int, width: int, tile: int, tiles: Iterable[Tile], block: int = COVERAGE_BLOCK) -> None:
        self.height, self.width, self.block = int(height), int(width), int(block)
        self.cells = np.zeros((math.ceil(self.height / block), math.ceil(self.width / block)), dtype=bool)
        for t in tiles:
            self.cells[t.y // block:math.ceil(min(t.y + tile, self.height) / block),
                       t.x // block:math.ceil(min(t.x + tile, self.width) / block)] = True

    @classmethod
    def full(cls, height: int, width: int, block: int = COVERAGE_BLOCK) -> Coverage:
        """Everything covered (no knowledge: every region is read)."""
        cov = cls(height, width, 1, (), block)
        cov.cells[:] = True
        return cov

    def _cells(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> np.ndarray:
        x1 = self.width if x1 is None else x1
        b = self.block
        return self.cells[max(0, y0) // b:math.ceil(min(y1, self.height) / b),
                          max(0, x0) // b:math.ceil(min(x1, self.width) / b)]

    def any(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> bool:
        """Whether any pixel of rows [y0, y1) x columns [x0, x1) may be non-background."""
        return bool(self._cells(y0, y1, x0, x1).any())

    def columns(self, y0: int, y1: int) -> np.ndarray:
        """Per cell column: whether rows [y0, y1) are covered there (cell ``i`` spans ``i * block`` ...)."""
        return self._cells(y0, y1).any(axis=0)
