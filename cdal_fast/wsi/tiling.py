"""Tile grid at the model's resolution and the blending window that hides tile borders.

Tiles are laid out row-major with stride ``tile - overlap``; the last row/column is shifted
back so every tile lies inside the slide (slides smaller than a tile get one padded tile).
Overlapping predictions are averaged with a separable window that is 1 in the tile centre and
falls smoothly (cosine ramp) across the overlap, reaching 0 before the tile edge, so no seam shows
where tiles meet and the network's padding-distorted edge pixels never reach the output.

Shifted tiling (:class:`VoteGrid`) is the other layout: vote ``v`` of ``V`` runs on its own grid,
offset by :func:`vote_offsets`, whose tiles partition the slide into cells (each pixel is decided by
exactly one tile of each grid, so it gets exactly V votes); tile borders fall in different places
for each vote and average out, at the cost per area of a grid without overlap. A tile of such a grid
carries its vote and its cell.

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

__all__ = ["Tile", "TileGrid", "VoteGrid", "Coverage", "COVERAGE_BLOCK", "blend_1d", "blend_window", "vote_offsets",
           "cell_layout", "merge_vote_tiles", "vote_grids", "TILINGS"]

TILINGS = ("blend", "shifted")  # overlapping tiles blended with a window / one shifted grid per vote

COVERAGE_BLOCK = 64  # working px per coverage cell: 2.4 MB of flags for a 100000^2 working map


@dataclass(frozen=True)
class Tile:
    index: int
    row: int
    col: int
    y: int  # top-left corner in working-resolution pixels
    x: int
    vote: int | None = None  # shifted tiling: the one vote this tile gives (its grid); None: all votes
    cell: tuple[int, int, int, int] | None = None  # shifted tiling: (y0, y1, x0, x1), the pixels it decides


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


class _Rows:
    """What every grid offers tile selection: tile starts per axis (``ys``, ``xs``) and rows of tiles."""

    ys: list[int]
    xs: list[int]

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
        raise NotImplementedError

    def iter_tiles(self) -> Iterator[Tile]:
        """Every tile, row-major, one row built at a time."""
        for row in range(self.rows):
            yield from self.row_tiles(row)

    def tiles(self) -> list[Tile]:
        """Every tile as a list: only for grids that are sampled whole (memory grows with the slide)."""
        return list(self.iter_tiles())


@dataclass
class TileGrid(_Rows):
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

    def row_tiles(self, row: int) -> list[Tile]:
        """The tiles of one tile row, left to right."""
        y = self.ys[row]
        return [Tile(row * self.cols + c, row, c, y, x) for c, x in enumerate(self.xs)]

    def row_end(self, row: int) -> int:
        """Working rows < this value receive no contribution from tile rows after ``row``."""
        return self.ys[row + 1] if row + 1 < self.rows else self.height


def vote_offsets(votes: int, stride: int) -> list[tuple[int, int]]:
    """(dy, dx) grid offset of each vote, in [0, stride): a rank-1 lattice, so no two votes share a
    tile border in either axis (vote 0 is the unshifted grid). The column offsets step through the
    votes by a generator coprime with ``votes`` near the golden ratio, which spreads the borders in
    2-D instead of along the diagonal."""
    gen = max(1, round(votes * 0.618))
    while math.gcd(gen, votes) != 1:
        gen -= 1
    return [((v * stride) // votes, (((v * gen) % votes) * stride) // votes) for v in range(votes)]


def cell_layout(length: int, tile: int, stride: int, offset: int) -> list[tuple[int, int, int]]:
    """One axis of a shifted grid: (tile start, cell start, cell end) per cell. Cell borders lie at
    ``offset + k * stride``, except that an edge cell merges into its neighbour when both fit in one
    tile (no tile is spent on a sliver the next tile covers anyway; a slide under a tile is one cell).
    Each cell's tile starts ``(tile - stride) // 2`` before the cell (its context), moved as little as
    needed to contain the cell and to stay inside [0, length)."""
    if not 0 < stride <= tile:
        raise ValueError(f"stride must be in (0, {tile}], got {stride}")
    margin = (tile - stride) // 2
    first = offset % stride or stride
    bounds = [0, *range(first, length, stride), length]
    while len(bounds) > 2 and bounds[2] <= tile:
        del bounds[1]
    while len(bounds) > 2 and length - bounds[-3] <= tile:
        del bounds[-2]
    last = max(0, length - tile)

    def start(c0: int, c1: int) -> int:
        wanted = min(max(c0 - margin, c1 - tile), c0)  # context before the cell, yet the whole cell inside
        return min(max(wanted, 0), last)  # inside the slide (a slide under a tile: from 0)

    return [(start(c0, c1), c0, c1) for c0, c1 in zip(bounds, bounds[1:])]


@dataclass
class VoteGrid(_Rows):
    """The grid of one vote in shifted tiling: cells of ``tile - context`` px whose borders are offset
    by ``offset``; every working pixel lies in exactly one cell. Same interface as :class:`TileGrid`
    for tile selection (``ys``, ``xs``, ``row_tiles``)."""

    height: int
    width: int
    tile: int
    context: int  # px of each tile around its cell (as the blended grid's overlap)
    offset: tuple[int, int]
    vote: int

    def __post_init__(self) -> None:
        if not 0 <= self.context < self.tile:
            raise ValueError(f"tile context must be in [0, {self.tile}), got {self.context}")
        stride = self.tile - self.context
        self.rows_layout = cell_layout(self.height, self.tile, stride, self.offset[0])
        self.cols_layout = cell_layout(self.width, self.tile, stride, self.offset[1])
        self.ys = [t for t, _, _ in self.rows_layout]
        self.xs = [t for t, _, _ in self.cols_layout]

    def row_tiles(self, row: int) -> list[Tile]:
        """The tiles of one row of cells, left to right, each with its vote and cell."""
        y, cy0, cy1 = self.rows_layout[row]
        return [Tile(row * self.cols + c, row, c, y, x, self.vote, (cy0, cy1, cx0, cx1))
                for c, (x, cx0, cx1) in enumerate(self.cols_layout)]


def vote_grids(height: int, width: int, tile: int, context: int, votes: int) -> list[VoteGrid]:
    """Shifted tiling of a working image: one grid per vote, offset by :func:`vote_offsets`."""
    return [VoteGrid(height, width, tile, context, offset, v)
            for v, offset in enumerate(vote_offsets(votes, tile - context))]


def merge_vote_tiles(per_vote: Iterable[list[Tile]]) -> list[Tile]:
    """The tiles of every vote's grid in one list in stitching order: by top row, then vote, then column
    (the stitcher needs tops that never decrease; the order is a function of the tiles alone)."""
    return sorted((t for tiles in per_vote for t in tiles), key=lambda t: (t.y, t.vote, t.x))


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
