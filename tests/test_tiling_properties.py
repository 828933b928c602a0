"""Property tests of the tiling and stitching arithmetic (hypothesis): for any slide size, tile size,
overlap and resolution ratio, the blended output covers every pixel with weights summing to 1, and
no tile read reaches outside the slide level."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdal_fast.sampling.decode import MaskChannels
from cdal_fast.wsi.pipeline import BandStitcher, tile_region
from cdal_fast.wsi.tiling import TileGrid

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def grids(draw) -> TileGrid:
    tile = draw(st.sampled_from([4, 8, 16, 32]))
    overlap = draw(st.integers(0, tile - 1))
    return TileGrid(draw(st.integers(1, 120)), draw(st.integers(1, 120)), tile, overlap)


@SETTINGS
@given(grids())
def test_blend_weights_cover_every_pixel_and_normalise_to_one(grid):
    prob, std = np.zeros((grid.height, grid.width), np.uint8), np.zeros((grid.height, grid.width), np.uint8)
    stitcher = BandStitcher(grid, 1, prob, std, kind=MaskChannels(1))
    total = np.zeros((grid.height, grid.width))
    p = grid.tile
    ones = torch.ones(1, p, p)
    for t in grid.tiles():
        # the raw weights this tile contributes, re-derived from the stitcher's own windows
        key = (t.y > 0, t.y + p < grid.height, t.x > 0, t.x + p < grid.width)
        h, w = min(p, grid.height - t.y), min(p, grid.width - t.x)
        total[t.y:t.y + h, t.x:t.x + w] += stitcher.windows[key][:h, :w].numpy()
        stitcher.add(t, ones, torch.zeros(1, p, p))
    stitcher.flush(grid.height)
    assert (total > 0).all()  # no pixel is left without a contributing tile
    assert (prob == 255).all()  # a constant 1 blends to exactly 1 everywhere: the weights sum to 1


@SETTINGS
@given(grids(), st.floats(0.25, 8.0), st.integers(-3, 3), st.integers(-3, 3))
def test_tile_reads_stay_inside_the_level(grid, scale, dw, dh):
    # the level's size as a pyramid would round it: working size x scale, give or take a few pixels
    level_w = max(1, round(grid.width * scale) + dw)
    level_h = max(1, round(grid.height * scale) + dh)
    for t in grid.tiles():
        x, y, side = tile_region(t, grid.tile, scale, level_w, level_h)
        assert side == max(1, round(grid.tile * scale))
        assert x >= 0 and y >= 0
        if side <= level_w:
            assert x + side <= level_w
        else:
            assert x == 0  # a level narrower than one tile: read from the origin, the reader pads
        if side <= level_h:
            assert y + side <= level_h
        else:
            assert y == 0
        # the read stays on the tile's own footprint (within rounding of the clamp)
        assert abs(x - t.x * scale) <= max(1.0, abs(dw) + 1.0) + max(0, side - level_w)
