"""`segment`'s nucleus outputs: real slide runs (tiling, stitching, band labelling) with a stand-in sampler.

The stand-in maps dark pixels to probability 1, so the slide's painted discs are the nuclei and
every expected number (count, area, centroid) is known by construction. Discs sit on tile borders
and on the post-process band borders, at a working scale half the slide's (level-0 scaling).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import torch
from PIL import Image
from shapely.geometry import shape

from cdal_fast.network.config import get_preset
from cdal_fast.wsi.options import SegmentOptions
from cdal_fast.wsi.outputs import is_complete, required_outputs
from cdal_fast.wsi.pipeline import segment_slide

from .slides import write_ome_pyramid

MPP0 = 0.25  # slide um/px; the tiny model works at 0.5 (scale 2)
SIDE = 600  # level-0 px; working 300 px, tiles 64 with overlap 16 (stride 48), bands of 64 rows
RADIUS = 12  # level-0 px: 6 working px, area ~28 um^2
BACKGROUND, NUCLEUS = (240, 240, 240), (70, 30, 120)
# Centres (x, y) in level-0 px: on the band borders (working rows 64, 128, 192 -> y 128, 256, 384),
# on tile borders (working 48, 96, 144 -> 96, 192, 288), on both, and away from any border.
CENTRES = [(96, 128), (300, 256), (192, 384), (450, 60), (60, 500), (520, 520), (288, 190)]
TRUE_AREA_UM2 = math.pi * RADIUS**2 * MPP0**2


class DarkIsNucleus:
    """SamplerLike stand-in: P = 1 where the normalised image is darker than half-way from disc to
    glass, std 0.1 there."""

    num_steps, votes, mask_channels, nz = 1, 2, 1, 4

    def __call__(self, image: torch.Tensor, x_init: torch.Tensor, z: torch.Tensor,
                 post_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prob = (image.mean(1, keepdim=True) < 0.5).float()
        return prob, prob * 0.1


def disc_image() -> np.ndarray:
    img = np.empty((SIDE, SIDE, 3), np.uint8)
    img[:] = BACKGROUND
    yy, xx = np.mgrid[:SIDE, :SIDE]
    for cx, cy in CENTRES:
        img[(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= RADIUS**2] = NUCLEUS
    return img


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("slides")
    img = disc_image()
    Image.fromarray(img).save(folder / "discs.png")
    return {"ome": write_ome_pyramid(folder / "discs.ome.tif", img, mpp=MPP0, levels=2),
            "png": folder / "discs.png"}


def run(path: Path, out: Path, **kw) -> dict:
    opts = SegmentOptions(batch_size=4, workers=0, tile_overlap=16, tissue=False, mpp=MPP0, **kw)
    return segment_slide(path, out, DarkIsNucleus(), get_preset("tiny"), opts, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["ome", "png"])
def test_slide_nuclei_are_whole_valid_and_on_the_level0_grid(tmp_path, inputs, kind):
    out = tmp_path / "out"
    summary = run(inputs[kind], out, save_labels=True)
    stem = "discs"
    assert summary["nuclei_count"] == len(CENTRES)
    # density per mm^2 of the analysed area (no tissue detection: the whole image)
    assert summary["nuclei_per_mm2_tissue"] == pytest.approx(len(CENTRES) / (SIDE * SIDE * MPP0**2 / 1e6), rel=1e-3)

    features = json.loads((out / f"{stem}.nuclei.geojson").read_text())["features"]
    rows = list(csv.DictReader((out / f"{stem}.nuclei.csv").open()))
    assert len(features) == len(rows) == summary["nuclei_count"]
    assert len({f["id"] for f in features}) == len({int(r["id"]) for r in rows}) == len(CENTRES)
    found = []
    for f in features:
        poly = shape(f["geometry"])
        assert poly.is_valid and poly.geom_type == "Polygon"
        x0, y0, x1, y1 = poly.bounds
        assert 0 <= x0 and 0 <= y0 and x1 <= SIDE and y1 <= SIDE
        assert f["properties"]["objectType"] == "detection"
        found.append(poly)
    for r in rows:
        # every disc whole (a disc cut at a border would have about half the area) ...
        assert float(r["area_um2"]) == pytest.approx(TRUE_AREA_UM2, rel=0.15)
        # ... at its level-0 position, in um from the slide's mpp
        cx, cy = float(r["centroid_x_px"]), float(r["centroid_y_px"])
        assert min(math.hypot(cx - x, cy - y) for x, y in CENTRES) < 1.5
        assert float(r["centroid_x_um"]) == pytest.approx(cx * MPP0)
        assert float(r["mean_uncertainty"]) == pytest.approx(0.1, abs=0.01)
    for x, y in CENTRES:  # each disc is covered by exactly one outline of about its size
        hits = [p for p in found if p.contains(shapely.Point(x, y))]
        assert len(hits) == 1 and hits[0].area == pytest.approx(math.pi * RADIUS**2, rel=0.15)

    labels_file = out / f"{stem}.labels.ome.tif"
    with tifffile.TiffFile(labels_file) as t:
        level0 = t.series[0].levels[0].asarray()
    assert level0.dtype == np.uint32 and level0.shape == (SIDE, SIDE)
    assert set(np.unique(level0)) - {0} == {int(r["id"]) for r in rows}
    by_id = {int(r["id"]): (float(r["centroid_x_px"]), float(r["centroid_y_px"])) for r in rows}
    for x, y in CENTRES:
        nid = int(level0[y, x])
        assert math.hypot(by_id[nid][0] - x, by_id[nid][1] - y) < 1.5  # the raster agrees with the table

    opts = SegmentOptions(save_labels=True)
    small = kind == "png"
    assert is_complete(out, stem, small, "ome", required_outputs(opts))
    (out / f"{stem}.nuclei.csv").unlink()  # a missing nucleus file means the slide is not done
    assert not is_complete(out, stem, small, "ome", required_outputs(opts))
    assert is_complete(out, stem, small, "ome", required_outputs(replace(opts, nuclei_csv=False)))


def test_nucleus_outputs_follow_the_options(tmp_path, inputs):
    out = tmp_path / "out"
    summary = run(inputs["ome"], out, nuclei_gzip=True, nuclei_csv=False, nuclei_min_area_um2=40.0)
    assert summary["nuclei_count"] == 0  # every disc (~28 um^2) is below the minimum area
    assert summary["nuclei"]["params"]["min_area_um2"] == 40.0
    assert (out / "discs.nuclei.geojson.gz").is_file()
    assert not (out / "discs.nuclei.geojson").exists() and not (out / "discs.nuclei.csv").exists()
    off = run(inputs["ome"], tmp_path / "off", nuclei=False)
    assert "nuclei_count" not in off and not list((tmp_path / "off").glob("*nuclei*"))
