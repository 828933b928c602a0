"""Regions of interest: GeoJSON polygons (holes, multipolygons, validation) and mask images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cdal_fast.wsi.readers import SlideError
from cdal_fast.wsi.roi import load_roi, roi_for_slide


def _feature(geometry: dict, name: str) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": {"name": name}}


RING = [[100, 100], [300, 100], [300, 300], [100, 300], [100, 100]]  # (x, y), 200 x 200
HOLE = [[150, 150], [250, 150], [250, 250], [150, 250], [150, 150]]  # 100 x 100
SQUARES = [[[[400, 0], [440, 0], [440, 40], [400, 40], [400, 0]]],
           [[[0, 400], [20, 400], [20, 420], [0, 420], [0, 400]]]]


def _write(path, features) -> None:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def test_geojson_holes_multipolygons_area_and_raster(tmp_path):
    path = tmp_path / "a.geojson"
    _write(path, [_feature({"type": "Polygon", "coordinates": [RING, HOLE]}, "tumour"),
                  _feature({"type": "MultiPolygon", "coordinates": SQUARES}, "islands")])
    roi = load_roi(path, 500, 500)
    assert roi.kind == "geojson" and roi.features == 2
    assert roi.area_px() == pytest.approx(200 * 200 - 100 * 100 + 40 * 40 + 20 * 20)
    full = roi.rasterise(500, 500, 1.0)
    assert full.sum() == 200 * 200 - 100 * 100 + 40 * 40 + 20 * 20  # pixel centres: exact for integer boxes
    assert full[120, 120] and not full[200, 200] and full[10, 420] and full[410, 10] and not full[50, 50]
    coarse = roi.rasterise(50, 50, 10.0)  # 10 level-0 px per pixel
    assert coarse[12, 12] and not coarse[20, 20] and coarse[1, 41] and not coarse[45, 45]
    band = roi.rasterise(100, 500, 1.0, row0=150)  # rows 150..249 of the full raster
    assert np.array_equal(band, full[150:250])
    # all_touched: a polygon smaller than one coarse pixel still marks the pixel it lies in
    tiny = tmp_path / "t.geojson"
    _write(tiny, [_feature({"type": "Polygon", "coordinates": [[[33, 33], [35, 33], [35, 35], [33, 33]]]}, "dot")])
    t = load_roi(tiny, 500, 500)
    assert t.rasterise(50, 50, 10.0, all_touched=True)[3, 3]


def test_invalid_geometry_names_file_and_feature(tmp_path):
    bowtie = [[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]
    path = tmp_path / "bad.geojson"
    _write(path, [_feature({"type": "Polygon", "coordinates": [RING]}, "ok"),
                  _feature({"type": "Polygon", "coordinates": [bowtie]}, "bowtie")])
    with pytest.raises(SlideError, match=r"bad\.geojson: feature 1 \('bowtie'\) is an invalid polygon: "
                                         r"Self-intersection"):
        load_roi(path, 500, 500)
    _write(path, [_feature({"type": "Point", "coordinates": [1, 2]}, "pin")])
    with pytest.raises(SlideError, match=r"feature 0 \('pin'\) is a Point; a region of interest must be a Polygon"):
        load_roi(path, 500, 500)
    _write(path, [])
    with pytest.raises(SlideError, match="no polygons"):
        load_roi(path, 500, 500)


def test_mask_roi_at_a_pyramid_scale_and_folder_matching(tmp_path):
    mask = np.zeros((125, 100), dtype=np.uint8)  # a 400 x 500 slide at 1/4 scale
    mask[25:50, 10:30] = 255
    folder = tmp_path / "rois"
    folder.mkdir()
    Image.fromarray(mask).save(folder / "slideA.png")
    roi = roi_for_slide(folder, "slideA", 400, 500)
    assert roi.kind == "mask" and roi.area_px() == 25 * 20 * 16
    full = roi.rasterise(500, 400, 1.0)
    assert full.sum() == 25 * 20 * 16 and full[100, 40] and not full[99, 40] and not full[100, 120]
    # inside = level-0 rows 100..199, cols 40..119; a 60-px cell (rows 60..119, cols 0..59) touches it,
    # its centre (90, 30) is outside
    assert roi.rasterise(9, 7, 60.0, all_touched=True)[1, 0] and not roi.rasterise(9, 7, 60.0)[1, 0]
    assert not roi.rasterise(9, 7, 60.0, all_touched=True)[0, 0]  # rows 0..59
    with pytest.raises(SlideError, match=r"no region of interest for slide 'slideB'"):
        roi_for_slide(folder, "slideB", 400, 500)
    with pytest.raises(SlideError, match=r"a 100 x 125 mask is not a scaled copy of the 400 x 300 slide"):
        roi_for_slide(folder, "slideA", 400, 300)
