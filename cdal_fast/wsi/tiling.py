"""Tile grid at the model's resolution and the blending window that hides tile borders.

Tiles are laid out row-major with stride ``tile - overlap``; the last row/column is shifted
back so every tile lies inside the slide (slides smaller than a tile get one padded tile).
Overlapping predictions are averaged with a separable window that is 1 in the tile centre and
falls smoothly (cosine ramp) across the overlap, reaching 0 before the tile edge, so no seam shows
where tiles meet and the network's padding-distorted edge pixels never reach the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Tile", "TileGrid", "blend_1d", "blend_window"]


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

    def tiles(self) -> list[Tile]:
        return [Tile(r * self.cols + c, r, c, y, x) for r, y in enumerate(self.ys) for c, x in enumerate(self.xs)]

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
