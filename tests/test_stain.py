"""Issue 36: stain measurements per nucleus, IHC positivity, Macenko estimation and normalisation.

Constructed slides paint nuclei with known haematoxylin and DAB concentrations (Beer-Lambert in
Ruifrok-Johnston's vectors), so the classes and optical densities the pipeline reports must follow
the constructed truth; real pixels come from the bundled IHC sample (shipped model, one vote) and a
MoNuSeg training tile.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cdal_fast.network.config import get_preset
from cdal_fast.nuclei.bands import BandLabeller, iter_bands, label_image
from cdal_fast.nuclei.measure import Grid
from cdal_fast.nuclei.params import NucleiParams
from cdal_fast.nuclei.stain import (
    CLASS_NAMES,
    DAB,
    HEMATOXYLIN,
    PositivityRule,
    StainNormaliser,
    StainProfile,
    concentrations,
    default_profile,
    estimate_macenko,
    normalise_stains,
    positivity_summary,
)
from cdal_fast.stain_reference import load_stain_reference
from cdal_fast.wsi.options import OptionsError, SegmentOptions
from cdal_fast.wsi.pipeline import segment_slide

from .slides import write_ome_pyramid
from .test_segment_nuclei import DarkIsNucleus

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "cdal_fast" / "samples" / "sample_ihc.ome.tif"
MPP0 = 0.25  # the tiny model works at 0.5 um/px: the RGB rows are resampled (scale 2)
SIDE = 600
RADIUS = 14  # level-0 px (7 working px, ~38 um^2)
H_OD = 0.5
DAB_TRUTH = (0.05, 0.3, 0.5, 0.85)  # one of each class at QuPath's 0.2 / 0.4 / 0.6
COLUMNS_X = (90, 230, 370, 510)
RINGED_Y, PLAIN_Y = 150, 420  # nuclei with a DAB-stained membrane ring, and without
RING_DAB = 0.3


def stained(h: float, d: float) -> np.ndarray:
    """uint8 RGB of a pixel holding ``h`` haematoxylin and ``d`` DAB (OD units)."""
    od = h * np.asarray(default_profile("h-dab").vectors[0]) + d * np.asarray(default_profile("h-dab").vectors[1])
    return np.clip(np.rint(255 * 10 ** (-od)), 0, 255).astype(np.uint8)


def constructed_slide() -> np.ndarray:
    img = np.full((SIDE, SIDE, 3), 240, np.uint8)
    yy, xx = np.mgrid[:SIDE, :SIDE] + 0.5
    for y in (RINGED_Y, PLAIN_Y):
        for x, d in zip(COLUMNS_X, DAB_TRUTH):
            r2 = (xx - x) ** 2 + (yy - y) ** 2
            if y == RINGED_Y:  # a 1.5 um DAB-only membrane just outside the nucleus
                img[(r2 > RADIUS**2) & (r2 <= (RADIUS + 6) ** 2)] = stained(0.0, RING_DAB)
            img[r2 <= RADIUS**2] = stained(H_OD, d)
    return img


@pytest.fixture(scope="module")
def ihc_run(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("ihc")
    slide = write_ome_pyramid(folder / "constructed.ome.tif", constructed_slide(), mpp=MPP0, levels=2)
    opts = SegmentOptions(batch_size=4, workers=0, tile_overlap=16, tissue=False, stain="h-dab", nuclei_parquet=False)
    out = folder / "out"
    summary = segment_slide(slide, out, DarkIsNucleus(), get_preset("tiny"), opts, torch.device("cpu"))
    return out, summary


def _rows(out: Path, stem: str) -> list[dict]:
    with open(out / f"{stem}.nuclei.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _truth_at(x: float, y: float) -> tuple[float, bool]:
    """(DAB truth, ringed) of the constructed nucleus nearest level-0 point (x, y)."""
    col = int(np.argmin([abs(x - c) for c in COLUMNS_X]))
    return DAB_TRUTH[col], abs(y - RINGED_Y) < abs(y - PLAIN_Y)


def test_positivity_follows_the_constructed_dab_concentrations(ihc_run):
    out, summary = ihc_run
    rows = _rows(out, "constructed")
    assert len(rows) == 8 == summary["nuclei_count"]
    for r in rows:
        dab, ringed = _truth_at(float(r["centroid_x_px"]), float(r["centroid_y_px"]))
        expected = CLASS_NAMES[sum(dab >= t for t in (0.2, 0.4, 0.6))]
        assert r["class"] == expected, (r["class"], dab)
        # the optical densities under the nucleus are the painted ones (edges are blended by the resampling)
        assert float(r["nucleus_dab_od_mean"]) == pytest.approx(dab, rel=0.15, abs=0.02)
        assert float(r["nucleus_hematoxylin_od_mean"]) == pytest.approx(H_OD, rel=0.15)
        assert float(r["nucleus_dab_od_max"]) >= float(r["nucleus_dab_od_mean"])
        # the ring sees the membrane stain where it was painted, glass where it was not
        if ringed:
            assert float(r["cytoplasm_dab_od_mean"]) > 0.15
        else:
            assert float(r["cytoplasm_dab_od_mean"]) < 0.05
        assert float(r["cell_area_um2"]) > float(r["area_um2"])
    pos = summary["positivity"]
    assert pos["counts"] == {"Negative": 2, "1+": 2, "2+": 2, "3+": 2}
    assert pos["positive_percent"] == pytest.approx(75.0)
    assert pos["h_score"] == pytest.approx(25 + 2 * 25 + 3 * 25)
    area_mm2 = SIDE * SIDE * MPP0**2 / 1e6
    assert pos["per_mm2_tissue"]["3+"] == pytest.approx(2 / area_mm2, rel=1e-3)


def test_geojson_carries_the_class_and_qupath_measurements(ihc_run):
    out, _ = ihc_run
    features = json.loads((out / "constructed.nuclei.geojson").read_text())["features"]
    names = {f["properties"]["classification"]["name"] for f in features}
    assert names == set(CLASS_NAMES)
    for f in features:
        m = f["properties"]["measurements"]
        assert {"Nucleus: DAB OD mean", "Nucleus: Hematoxylin OD max", "Cytoplasm: DAB OD mean",
                "Cell: DAB OD mean", "Cell: Area um^2"} <= set(m)
        cls = f["properties"]["classification"]["name"]
        assert cls == CLASS_NAMES[sum(m["Nucleus: DAB OD mean"] >= t for t in (0.2, 0.4, 0.6))]


def test_h_and_e_measures_eosin_without_classes(tmp_path):
    img = constructed_slide()
    slide = write_ome_pyramid(tmp_path / "he.ome.tif", img, mpp=MPP0, levels=1)
    opts = SegmentOptions(batch_size=4, workers=0, tile_overlap=16, tissue=False)  # the default stain: h-e
    summary = segment_slide(slide, tmp_path / "out", DarkIsNucleus(), get_preset("tiny"), opts, torch.device("cpu"))
    rows = _rows(tmp_path / "out", "he")
    assert "positivity" not in summary and "class" not in rows[0]
    assert {"nucleus_eosin_od_mean", "cytoplasm_eosin_od_max", "cell_hematoxylin_od_mean"} <= set(rows[0])
    feature = json.loads((tmp_path / "out" / "he.nuclei.geojson").read_text())["features"][0]
    assert feature["properties"]["classification"]["name"] == "Nucleus"
    off = segment_slide(slide, tmp_path / "none", DarkIsNucleus(), get_preset("tiny"),
                        SegmentOptions(batch_size=4, workers=0, tile_overlap=16, tissue=False, stain="none"),
                        torch.device("cpu"))
    assert off["nuclei_count"] == summary["nuclei_count"]
    assert "nucleus_eosin_od_mean" not in _rows(tmp_path / "none", "he")[0]


@pytest.mark.slow
def test_sample_slide_positivity_matches_an_independent_deconvolution(tmp_path):
    """Real IHC pixels: every nucleus's DAB / haematoxylin OD mean equals a least-squares unmixing of
    the slide's own pixels under its label (the sample is at the model's 0.5 um/px: no resampling)."""
    from cdal_fast.models import load_model
    from cdal_fast.sampling.sampler import FixedStepSampler

    bundle = load_model()
    sampler = FixedStepSampler(bundle.generator, votes=1)
    opts = SegmentOptions(batch_size=1, workers=0, tile_overlap=64, stain="h-dab", save_labels=True)
    summary = segment_slide(SAMPLE, tmp_path, sampler, bundle.config, opts, torch.device("cpu"))
    rows = _rows(tmp_path, "sample_ihc")
    assert summary["nuclei_count"] == len(rows) > 20
    pos = summary["positivity"]
    assert sum(pos["counts"].values()) == len(rows)
    pct = {k: 100 * v / len(rows) for k, v in pos["counts"].items()}
    assert pos["h_score"] == pytest.approx(pct["1+"] + 2 * pct["2+"] + 3 * pct["3+"], abs=1e-2)
    rgb = tifffile.imread(SAMPLE)
    with tifffile.TiffFile(tmp_path / "sample_ihc.labels.ome.tif") as t:
        labels = t.series[0].levels[0].asarray()
    od = -np.log10(np.maximum(rgb.reshape(-1, 3).astype(np.float64), 1) / 255)
    stains = np.stack([np.asarray(HEMATOXYLIN), np.asarray(DAB)], axis=1)
    stains /= np.linalg.norm(stains, axis=0)
    conc = np.linalg.lstsq(stains, od.T, rcond=None)[0].T.reshape(*labels.shape, 2)
    for r in rows[::5]:
        inside = labels == int(r["id"])
        assert float(r["nucleus_dab_od_mean"]) == pytest.approx(conc[inside, 1].mean(), abs=1e-4)
        assert float(r["nucleus_hematoxylin_od_mean"]) == pytest.approx(conc[inside, 0].mean(), abs=1e-4)
        assert r["class"] == CLASS_NAMES[sum(conc[inside, 1].mean() >= t for t in (0.2, 0.4, 0.6))]


def test_stain_values_do_not_depend_on_the_band_height():
    rng = np.random.default_rng(3)
    h, w = 160, 220
    prob = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[:h, :w]
    rgb = np.full((h, w, 3), 235, np.uint8)
    for _ in range(25):
        cy, cx, r2 = rng.integers(8, h - 8), rng.integers(8, w - 8), rng.integers(16, 70)
        if 60 <= cy <= 100:
            continue  # an empty stretch: bands there are skipped
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r2
        prob[disc] = 1.0
        rgb[disc] = stained(0.4, rng.uniform(0, 1))
    rgb = np.clip(rgb.astype(int) + rng.integers(-15, 16, rgb.shape), 0, 255).astype(np.uint8)
    prof = default_profile("h-dab")
    whole = sorted(label_image(prob, None, NucleiParams(), Grid(0.5), rgb=rgb, stain=prof),
                   key=lambda n: (n.centroid_y_px, n.centroid_x_px))
    for band, skip in [(1, False), (6, True), (17, False), (17, True), (64, False)]:
        lab = BandLabeller(NucleiParams(), w, Grid(0.5), h, stain=prof)
        got = []
        for y0, p in iter_bands(prob, band):
            if skip and not p.any() and not lab.holding:  # background rows skipped unread, as on a slide
                keep = min(p.shape[0], lab.context_rows)
                lab.skip_background(p.shape[0], rgb_tail=rgb[y0 + p.shape[0] - keep:y0 + p.shape[0]])
                continue
            got += lab.feed(p, None, y0, rgb=rgb[y0:y0 + p.shape[0]])
        got = sorted(got + lab.finish(), key=lambda n: (n.centroid_y_px, n.centroid_x_px))
        assert [n.polygon for n in got] == [n.polygon for n in whole]
        assert all(np.allclose(a.stain, b.stain, equal_nan=True) for a, b in zip(got, whole)), (band, skip)


def test_deconvolution_recovers_known_concentrations():
    prof = default_profile("h-dab")
    truth = np.array([[0.0, 0.0], [0.3, 0.0], [0.0, 0.7], [0.6, 0.4], [1.0, 1.0]])
    od = truth @ np.asarray(prof.vectors)
    rgb = (255 * 10 ** (-od)).round().clip(0, 255).astype(np.uint8)
    # 8-bit rounding of a dark pixel (intensity ~30) is worth ~0.015 OD
    assert concentrations(rgb, prof) == pytest.approx(truth.astype(np.float32), abs=0.02)


def test_macenko_recovers_the_stains_that_made_the_pixels():
    rng = np.random.default_rng(0)
    h_vec, e_vec = np.array([0.55, 0.76, 0.35]), np.array([0.20, 0.88, 0.43])
    h_vec, e_vec = h_vec / np.linalg.norm(h_vec), e_vec / np.linalg.norm(e_vec)
    conc = rng.gamma(2.0, 0.3, (20000, 2)) * (rng.random((20000, 2)) < 0.7)
    od = conc @ np.stack([h_vec, e_vec]) + rng.normal(0, 0.005, (20000, 3))
    rgb = (255 * 10 ** (-od)).round().clip(0, 255).astype(np.uint8)
    est = estimate_macenko(rgb, "h-e")
    assert est.names == ("Hematoxylin", "Eosin")
    assert float(np.dot(est.vectors[0], h_vec)) > 0.995 and float(np.dot(est.vectors[1], e_vec)) > 0.995
    # normalising onto its own estimate changes (almost) nothing; onto another profile moves the estimate there
    same = normalise_stains(rgb, est, est)
    assert np.abs(same.astype(int) - rgb.astype(int)).mean() < 3
    target = StainProfile("h-e", ("Hematoxylin", "Eosin"), (HEMATOXYLIN, (0.1, 0.95, 0.3)), (1.0, 0.5))
    moved = estimate_macenko(normalise_stains(rgb, est, target), "h-e")
    # within ~10 degrees: the 1st / 99th percentile angles sit slightly inside the pure stains
    assert float(np.dot(moved.vectors[0], target.vectors[0])) > 0.985
    assert float(np.dot(moved.vectors[1], target.vectors[1])) > 0.98


def test_normaliser_maps_a_real_tile_onto_the_shipped_reference(shared_data):
    reference = load_stain_reference(ROOT / "cdal_fast" / "models" / "monuseg")
    assert reference.kind == "h-e" and reference.max_concentrations is not None
    tile = tifffile.imread(shared_data / "monuseg" / "train" / "images" / "TCGA-21-5784-01Z-00-DX1.tif")[:400, :400, :3]
    ihc = tifffile.imread(SAMPLE)
    normalise = StainNormaliser(reference)
    for rgb in (tile, ihc):
        after = estimate_macenko(normalise(np.ascontiguousarray(rgb)), "h-e")
        for got, want in zip(after.vectors, reference.vectors):
            assert math.degrees(math.acos(min(1.0, float(np.dot(got, want))))) < 6.0
    assert normalise(np.full((50, 50, 3), 250, np.uint8)).tolist() == np.full((50, 50, 3), 250).tolist()
    assert normalise.skipped == 1  # blank glass: nothing to estimate, left as it is


def test_positivity_rule_and_summary():
    rule = PositivityRule()
    assert [rule.classify(v) for v in (0.0, 0.1999, 0.2, 0.4, 0.59, 0.6, 3.0, math.nan)] == [0, 0, 1, 2, 2, 3, 3, 0]
    assert PositivityRule(compartment="cell").index != rule.index
    for bad in [(0.4, 0.2, 0.6), (0.0, 0.2, 0.4), (0.2, 0.4), (0.2, 0.4, math.inf)]:
        with pytest.raises(ValueError):
            PositivityRule(bad)
    s = positivity_summary([6, 2, 1, 1], 2e6, rule)
    assert s["positive_percent"] == pytest.approx(40.0) and s["h_score"] == pytest.approx(20 + 20 + 30)
    assert s["per_mm2_tissue"]["Negative"] == pytest.approx(3.0)
    assert positivity_summary([0, 0, 0, 0], None, rule)["h_score"] is None
    with pytest.raises(OptionsError):
        SegmentOptions(positivity_thresholds=(0.5, 0.4, 0.6))
    with pytest.raises(OptionsError):
        SegmentOptions(stain="dab")


def test_estimated_vectors_and_normalisation_on_a_slide(tmp_path):
    """--stain-vectors estimate measures with the slide's own Macenko vectors (recorded in the JSON), in
    the painted DAB's order; --stain-normalise samples normalised tiles (the nuclei are still found); a
    slide with no stain falls back to the default vectors with a warning."""
    slide = write_ome_pyramid(tmp_path / "c.ome.tif", constructed_slide(), mpp=MPP0, levels=2)
    reference = load_stain_reference(ROOT / "cdal_fast" / "models" / "monuseg")
    opts = SegmentOptions(batch_size=4, workers=0, tile_overlap=16, tissue=False, stain="h-dab",
                          stain_vectors="estimate", stain_normalise=True, stain_reference=reference)
    summary = segment_slide(slide, tmp_path / "out", DarkIsNucleus(), get_preset("tiny"), opts, torch.device("cpu"))
    est = summary["stain_estimate"]
    assert est["kind"] == "h-dab" and summary["stain"] == est and not summary["warnings"]
    for got, want in zip(est["vectors"], default_profile("h-dab").vectors):
        assert float(np.dot(got, want)) > 0.97  # the painted stains are Ruifrok's (Macenko: within ~14 degrees)
    assert summary["options"]["stain_normalise"] is True
    rows = _rows(tmp_path / "out", "c")
    assert len(rows) == 8
    # the estimate is Macenko's (a little off the painted vectors), so the ODs differ from the painted
    # ones a little; their order does not: more DAB painted, higher DAB OD, never a lower class
    measured = sorted((_truth_at(float(r["centroid_x_px"]), float(r["centroid_y_px"]))[0],
                       float(r["nucleus_dab_od_mean"]), CLASS_NAMES.index(r["class"])) for r in rows)
    assert all(a[1] < b[1] and a[2] <= b[2] for a, b in zip(measured[::2], measured[2::2]))
    assert measured[0][2] == 0 and measured[-1][2] == 3
    blank = write_ome_pyramid(tmp_path / "blank.ome.tif", np.full((200, 200, 3), 240, np.uint8), mpp=MPP0, levels=1)
    empty = segment_slide(blank, tmp_path / "out", DarkIsNucleus(), get_preset("tiny"), opts, torch.device("cpu"))
    assert empty["stain_estimate"] is None and empty["stain"]["source"].startswith("Ruifrok")
    assert any("could not be estimated" in w for w in empty["warnings"])
