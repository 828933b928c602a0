"""Nucleus instances: separation, band-wise labelling, measurements, writers."""

from __future__ import annotations

import csv
import gzip
import json
import math

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from cdal_fast.nuclei import BandLabeller, NucleiParams, NucleiWriters, label_image, label_nuclei, nuclei_summary
from cdal_fast.nuclei.bands import iter_bands
from cdal_fast.nuclei.measure import Grid

MPP = 0.25
PARAMS = NucleiParams(prob_threshold=0.5, marker_h_um=0.5, min_area_um2=5.0)
H, W = 120, 200
# Disc centres (row, col), radius 11 px: two touching pairs, a touching triple and a loner.
CENTRES = [(30, 30), (30, 50), (80, 100), (80, 120), (100, 90), (60, 180), (8, 150), (10, 170)]
RADIUS = 11
TRIPLE_ROWS = (100 + RADIUS) - (80 - RADIUS) + 1


def discs(centres=CENTRES, shape=(H, W), value=0.9) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    prob = np.zeros(shape, np.float32)
    for cy, cx in centres:
        prob[(yy - cy) ** 2 + (xx - cx) ** 2 <= RADIUS**2] = value
    return prob


def signature(nuclei) -> list[tuple]:
    """Band-order-free description of a result: rounded area, centroid and outline per object."""
    return sorted((round(n.area_um2, 6), round(n.centroid_x_px, 6), round(n.centroid_y_px, 6), n.polygon)
                  for n in nuclei)


def test_touching_discs_split_into_one_object_each():
    labels = label_nuclei(discs(), PARAMS, MPP)
    assert labels.max() == len(CENTRES)
    for cy, cx in CENTRES:  # each centre in its own object
        assert labels[cy, cx] > 0
    assert len({labels[cy, cx] for cy, cx in CENTRES}) == len(CENTRES)


def test_larger_h_keeps_a_shallow_pair_whole():
    # Saddle of the (30,30)-(30,50) pair is 4.6 px deep below an 11 px peak: ~1.6 um at 0.25 um/px.
    pair = discs([(30, 30), (30, 50)], (60, 80))
    assert label_nuclei(pair, NucleiParams(marker_h_um=1.0), MPP).max() == 2
    assert label_nuclei(pair, NucleiParams(marker_h_um=2.0), MPP).max() == 1


def test_min_area_drops_specks():
    prob = discs([(20, 20)], (40, 60))
    prob[5:7, 50:52] = 0.9  # 4 px = 0.25 um^2
    assert label_nuclei(prob, NucleiParams(min_area_um2=1.0), MPP).max() == 1
    assert label_nuclei(prob, NucleiParams(min_area_um2=0.0), MPP).max() == 2


@pytest.mark.parametrize("field,value", [("prob_threshold", 1.0), ("prob_threshold", 0.0), ("marker_h_um", 0.0),
                                         ("min_area_um2", -1.0), ("marker_h_um", float("nan"))])
def test_params_validated(field, value):
    with pytest.raises(ValueError, match=f"NucleiParams.{field}"):
        NucleiParams(**{field: value})


@pytest.mark.parametrize("band_rows", [5, 17, 64])
@pytest.mark.parametrize("overlap", [0, 8])
def test_bands_give_the_whole_image_result(band_rows, overlap):
    prob = discs()
    std = np.linspace(0, 0.2, H * W, dtype=np.float32).reshape(H, W)
    whole = label_image(prob, std, PARAMS, Grid(MPP))
    labeller = BandLabeller(PARAMS, W, Grid(MPP), H)
    got = []
    for y0, band in iter_bands(prob, band_rows, overlap):
        got += labeller.feed(band, std[y0:y0 + band.shape[0]], y0)
        # held rows: at most this band, the tallest open component (the triple, rows 69..111) and 2 context rows
        assert labeller.buffer_rows <= band_rows + TRIPLE_ROWS + 2
    got += labeller.finish()
    assert signature(got) == signature(whole)
    assert [n.id for n in got] == list(range(1, len(CENTRES) + 1))
    assert labeller.cut == 0


def test_painted_labels_match_ids_and_areas_for_any_band_height():
    """labels_out (the --save-labels raster) holds each nucleus's pixels under its own id, band or not."""
    prob = discs()
    painted = {}
    for band_rows in (7, H):
        labels = np.zeros((H, W), np.uint32)
        labeller = BandLabeller(PARAMS, W, Grid(MPP), H, labels_out=labels)
        got = []
        for y0, band in iter_bands(prob, band_rows, overlap=3):
            got += labeller.feed(band, None, y0)
        got += labeller.finish()
        assert sorted(np.unique(labels[labels > 0])) == [n.id for n in got]
        for n in got:
            assert (labels == n.id).sum() * MPP**2 == pytest.approx(n.area_um2)
        painted[band_rows] = labels
    # same partition of the pixels (ids follow emission order, which depends on the band height)
    pairs = set(zip(painted[7].ravel().tolist(), painted[H].ravel().tolist()))
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(CENTRES) + 1


def test_nucleus_across_band_and_tile_border_reported_once_whole():
    # One nucleus centred on a band border (row 64) and on a 256-tile column border (col 256).
    prob = discs([(64, 256)], (128, 512))
    labeller = BandLabeller(PARAMS, 512, Grid(MPP, scale=2.0, x0=1000.0, y0=500.0), 128)
    got = []
    for y0, band in iter_bands(prob, 64, overlap=16):
        got += labeller.feed(band, None, y0)
    got += labeller.finish()
    assert len(got) == 1
    n = got[0]
    area_px = int((prob >= 0.5).sum())
    assert n.area_um2 == pytest.approx(area_px * MPP**2)
    # level-0 coordinates: scale 2, origin (1000, 500); the disc's centre pixel (64, 256) -> its middle
    assert (n.centroid_x_px, n.centroid_y_px) == pytest.approx((1000 + 256.5 * 2, 500 + 64.5 * 2))
    assert n.centroid_x_um == pytest.approx(n.centroid_x_px * MPP / 2)
    assert shapely.Polygon(n.polygon).area == pytest.approx(area_px * 4, rel=0.03)


def test_band_errors_are_specific():
    labeller = BandLabeller(PARAMS, 10, Grid(MPP), 20)
    with pytest.raises(ValueError, match="width 10"):
        labeller.feed(np.zeros((4, 11), np.float32))
    labeller.feed(np.zeros((4, 10), np.float32))
    with pytest.raises(ValueError, match="rows 4..5 are missing"):
        labeller.feed(np.zeros((4, 10), np.float32), y0=6)
    with pytest.raises(ValueError, match="4 of 20 rows"):
        labeller.finish()


def test_too_tall_component_is_cut_and_counted():
    prob = np.zeros((300, 20), np.float32)
    prob[:, 5:15] = 0.9  # a 75 um stripe, one component from top to bottom
    labeller = BandLabeller(NucleiParams(max_component_um=10.0), 20, Grid(MPP), 300)
    got = []
    for y0, band in iter_bands(prob, 20):
        got += labeller.feed(band, None, y0)
        assert labeller.buffer_rows <= 40 + 20 + 2
    got += labeller.finish()
    assert labeller.cut >= 1 and len(got) > 1
    assert sum(n.area_um2 for n in got) == pytest.approx(300 * 10 * MPP**2)


def test_measurements_of_a_disc_and_a_rectangle():
    prob = np.zeros((60, 80), np.float32)
    yy, xx = np.mgrid[:60, :80]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2
    prob[disc] = 0.8
    prob[40:50, 40:70] = 0.6  # 10 x 30 rectangle
    std = np.where(prob > 0, 0.1, 0.0).astype(np.float32)
    std[40:45, 40:70] = 0.3
    nuclei = label_image(prob, std, NucleiParams(marker_h_um=5.0), Grid(0.5))
    n_disc, n_rect = sorted(nuclei, key=lambda n: -n.area_um2)
    assert n_disc.area_um2 == pytest.approx(disc.sum() * 0.25)
    assert n_disc.equivalent_diameter_um == pytest.approx(math.sqrt(4 * disc.sum() / math.pi) * 0.5)
    # a digital disc of radius 15: its pixel squares fill 94 % of their convex hull (the staircase)
    assert n_disc.eccentricity < 0.05 and n_disc.circularity > 0.9 and n_disc.solidity > 0.93
    assert (n_disc.centroid_x_px, n_disc.centroid_y_px) == pytest.approx((20.5, 20.5))
    assert n_disc.mean_probability == pytest.approx(0.8, rel=1e-5)
    assert n_disc.mean_uncertainty == pytest.approx(0.1, rel=1e-5)
    assert n_rect.area_um2 == pytest.approx(300 * 0.25)
    assert n_rect.solidity == pytest.approx(1.0)
    assert n_rect.eccentricity == pytest.approx(math.sqrt(1 - (10**2 - 1) / (30**2 - 1)), abs=1e-6)
    assert n_rect.mean_uncertainty == pytest.approx(0.2, rel=1e-5)  # half the rows at 0.3, half at 0.1
    assert n_rect.circularity < 0.75  # 4 pi A / P^2 of a 1:3 rectangle is pi*3/16 = 0.59


@pytest.mark.parametrize("gz", [False, True])
def test_geojson_and_csv_are_valid_and_streamed(tmp_path, gz):
    prob = discs()
    nuclei = label_image(prob, None, PARAMS, Grid(MPP))
    with NucleiWriters(tmp_path, "slide", gzip_geojson=gz) as w:
        w.write(iter(nuclei[:3]))
        w.write(iter(nuclei[3:]))
        assert not w.paths[0].exists()  # only the partial file exists while writing
    geo = w.geojson_path
    text = gzip.open(geo, "rt").read() if gz else geo.read_text()
    fc = json.loads(text)
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == len(CENTRES)
    ids = [f["id"] for f in fc["features"]]
    assert len(set(ids)) == len(ids)
    assert len({f["properties"]["nucleus_id"] for f in fc["features"]}) == len(ids)
    for f in fc["features"]:
        props = f["properties"]
        assert props["objectType"] == "detection" and props["classification"]["name"] == "Nucleus"
        assert "Mean vote uncertainty" not in props["measurements"]  # no std given: left out, not NaN
        poly = shape(f["geometry"])
        assert poly.is_valid and poly.geom_type == "Polygon"
        minx, miny, maxx, maxy = poly.bounds
        assert 0 <= minx and 0 <= miny and maxx <= W and maxy <= H
        assert poly.area == pytest.approx(props["measurements"]["Area um^2"] / MPP**2, rel=0.1)
    rows = list(csv.DictReader(geo.with_name("slide.nuclei.csv").open()))
    assert [int(r["id"]) for r in rows] == [n.id for n in nuclei]
    assert rows[0]["mean_uncertainty"] == ""
    assert float(rows[0]["area_um2"]) == pytest.approx(nuclei[0].area_um2, rel=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in w.paths)


def test_writer_error_leaves_nothing(tmp_path):
    nuclei = label_image(discs(), None, PARAMS, Grid(MPP))
    with pytest.raises(RuntimeError, match="boom"), NucleiWriters(tmp_path, "s") as w:
        w.write(nuclei)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_summary_hand_computed():
    s = nuclei_summary(np.array([10.0, 20.0, 30.0, 40.0, 50.0]), tissue_area_um2=0.5e6)
    assert s == {"nuclei_count": 5, "nuclei_per_mm2_tissue": 10.0, "nucleus_area_um2_quartiles": [20.0, 30.0, 40.0]}
    assert nuclei_summary([], None) == {"nuclei_count": 0, "nuclei_per_mm2_tissue": None,
                                        "nucleus_area_um2_quartiles": None}
    with pytest.raises(ValueError, match="tissue area"):
        nuclei_summary([1.0], -1.0)


@pytest.mark.parametrize("skip", [False, True])
def test_a_component_starting_on_a_band_border_after_an_empty_buffer_is_labelled_as_whole(skip):
    """Its distance transform needs the background row above it: the labeller keeps context rows even
    when nothing was held (and after skipped background), or two touching nuclei starting exactly at
    a band border were split differently from a whole-image labelling (issue 36 review)."""
    h, w = 128, 120
    yy, xx = np.mgrid[:h, :w]
    prob = np.zeros((h, w), np.float32)
    for cx in (50, 64):
        prob[((yy - 71) ** 2 + (xx - cx) ** 2 <= 49) & (yy >= 64)] = 1.0
    prob[64:66, 40:75] = 1.0
    whole = label_image(prob, None, NucleiParams(), Grid(0.5))
    lab = BandLabeller(NucleiParams(), w, Grid(0.5), h)
    got = []
    for y0, band in iter_bands(prob, 32):
        if skip and not band.any() and not lab.holding:
            lab.skip_background(band.shape[0])
            continue
        got += lab.feed(band, None, y0)
    got += lab.finish()
    assert [n.polygon for n in got] == [n.polygon for n in whole] and len(whole) == 2
