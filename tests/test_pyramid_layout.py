"""Output pyramids: the OpenSlide-compatible layout shows every level to OpenSlide; OME keeps SubIFDs."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from cdal_fast.wsi.writer import write_pyramid


def _src() -> np.ndarray:
    return (np.arange(500 * 350).reshape(500, 350) % 251).astype(np.uint8)  # working map at half resolution


def test_openslide_layout_levels_and_downsamples(tmp_path):
    openslide = pytest.importorskip("openslide")
    path = tmp_path / "m.tif"
    write_pyramid(path, _src(), 1000, 700, 0.25, tile=128, layout="openslide", description="mask")
    with openslide.OpenSlide(str(path)) as s:
        # levels 1000x700 -> 500x350 -> 250x175 -> 125x88; OpenSlide averages the x and y ratios
        assert s.level_dimensions == ((700, 1000), (350, 500), (175, 250), (88, 125))
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0, (700 / 88 + 8.0) / 2))
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        level2 = np.asarray(s.read_region((0, 0), 2, (175, 250)))[:, :, 0]
    with tifffile.TiffFile(path) as t:
        assert np.array_equal(level2, t.pages[2].asarray())  # OpenSlide reads the same pixels
        assert np.array_equal(t.pages[0].asarray()[1::2, 1::2], _src())  # nearest neighbour from the map


def test_ome_layout_is_one_level_to_openslide(tmp_path):
    """Why the option exists: OpenSlide ignores SubIFDs, so the OME layout is a single level there."""
    openslide = pytest.importorskip("openslide")
    path = tmp_path / "m.ome.tif"
    write_pyramid(path, _src(), 1000, 700, 0.25, tile=128, layout="ome")
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_count == 1
    with tifffile.TiffFile(path) as t:
        assert [lv.shape for lv in t.series[0].levels] == [(1000, 700), (500, 350), (250, 175), (125, 88)]
    with pytest.raises(ValueError, match="pyramid layout must be one of ome, openslide"):
        write_pyramid(tmp_path / "x.tif", _src(), 10, 10, None, layout="deepzoom")
