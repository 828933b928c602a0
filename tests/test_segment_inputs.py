"""`segment` with the slide-input options: --roi, --save-tissue, --tissue-threshold, --pyramid-layout."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import tifffile
from PIL import Image
from shapely.geometry import shape

from cdal_fast.wsi.readers import open_slide
from cdal_fast.wsi.tissue import detect_tissue

from .test_segment import mosaic, run, slide, tiny_weights  # noqa: F401  (fixtures)

ROI_BOX = (300, 340, 700, 660)  # x0, y0, x1, y1 in level-0 px of the 1000 x 1000 mosaic (0.25 um/px)


def test_roi_tissue_mask_and_openslide_layout(tmp_path, slide, tiny_weights):  # noqa: F811
    x0, y0, x1, y1 = ROI_BOX
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {"name": "t"}}]}))
    out = tmp_path / "o"
    code, output = run([str(slide), "--out", str(out), "--weights", str(tiny_weights), "--workers", "0",
                        "--batch-size", "16", "--roi", str(roi), "--save-tissue", "--save-prob",
                        "--pyramid-layout", "openslide"])
    assert code == 0, output
    summary = json.loads((out / "mosaic.json").read_text())
    assert summary["roi"]["area_px"] == 400 * 320 and summary["roi"]["area_um2"] == pytest.approx(400 * 320 / 16)
    assert summary["warnings"] == [] and 0 < summary["tiles_sampled"] < summary["tiles_total"]
    # the tiny model's probabilities are > 0 inside; outside the ROI everything is background
    prob = tifffile.imread(out / "mosaic.prob.tif", key=0)
    assert prob.shape == (1000, 1000)
    inside = np.zeros(prob.shape, dtype=bool)
    inside[y0:y1, x0:x1] = True
    assert (prob[~inside] == 0).all() and (prob[inside] > 0).mean() > 0.9
    # nuclei only inside the ROI; their density refers to the tissue inside it
    for f in json.loads((out / "mosaic.nuclei.geojson").read_text())["features"]:
        bx0, by0, bx1, by1 = shape(f["geometry"]).bounds
        assert x0 <= bx0 and y0 <= by0 and bx1 <= x1 and by1 <= y1
    assert 0 < summary["nuclei"]["tissue_area_um2"] <= summary["roi"]["area_um2"]
    # the saved tissue mask is the one detected, at the scale the JSON names
    tissue = np.asarray(Image.open(out / "mosaic.tissue.png")) > 0
    with open_slide(slide) as s:
        det = detect_tissue(s, s.mpp)
    assert np.array_equal(tissue, det.mask)
    assert summary["tissue"]["thumbnail_downsample"] == 4.0 and summary["tissue"]["thumbnail_size"] == [250, 250]
    # a rerun with the same ROI resumes; the same path with other contents is another setting
    assert summary["roi"]["sha256"] == hashlib.sha256(roi.read_bytes()).hexdigest()
    args = [str(slide), "--out", str(out), "--weights", str(tiny_weights), "--workers", "0", "--roi", str(roi),
            "--save-tissue", "--save-prob", "--pyramid-layout", "openslide"]
    code, output = run(args)
    assert code == 0 and "0 done, 1 already complete" in output
    roi.write_text(roi.read_text().replace(f"[{x1}, {y1}]", f"[{x1}, {y1 + 20}]"))
    code, output = run(args)
    assert code == 1 and "OutputsFromOtherSettings" in output and "roi_sha256" in output
    assert json.loads((out / "mosaic.json").read_text())["roi"]["sha256"] == summary["roi"]["sha256"]
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(out / "mosaic.mask.tif")) as o:
        assert o.level_dimensions == ((1000, 1000), (500, 500))


def test_no_tissue_is_a_warning(tmp_path, slide, tiny_weights):  # noqa: F811
    out = tmp_path / "o"
    code, output = run([str(slide), "--out", str(out), "--weights", str(tiny_weights), "--workers", "0",
                        "--tissue-threshold", "254"])
    assert code == 0, output
    assert "warn" in output and "no tissue found (saturation threshold 254.0" in output
    summary = json.loads((out / "mosaic.json").read_text())
    assert summary["tiles_sampled"] == 0 and summary["warnings"][0].startswith("no tissue found")


def test_dicom_folder_segments_like_the_same_ome_tiff(tmp_path, mosaic, tiny_weights):  # noqa: F811
    pytest.importorskip("openslide")
    from .slides import write_dicom_wsi, write_ome_pyramid

    crop = mosaic[100:400, 100:420]  # glass margin and tissue
    folder = write_dicom_wsi(tmp_path / "case7", crop, mpp=0.25, levels=2)
    ome = write_ome_pyramid(tmp_path / "case7.ome.tif", crop, mpp=0.25, levels=2)
    masks = []
    for source, out in ((folder, tmp_path / "a"), (ome, tmp_path / "b")):
        code, output = run([str(source), "--out", str(out), "--weights", str(tiny_weights), "--workers", "0",
                            "--batch-size", "16", "--save-prob"])
        assert code == 0, output
        summary = json.loads((out / "case7.json").read_text())
        assert summary["level_read"] == 1 and summary["mpp"] == pytest.approx(0.25)  # 0.5 um/px level read
        masks.append(tifffile.imread(out / "case7.prob.ome.tif", key=0))
    assert masks[0].shape == (300, 320) and np.array_equal(masks[0], masks[1])
    assert json.loads((tmp_path / "a" / "case7.json").read_text())["mpp_source"] == "DICOM PixelSpacing"
