"""`cdal-fast segment` end to end on slides built from real MoNuSeg tiles."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from cdal_fast.cli import main
from cdal_fast.metrics import dice_iou
from cdal_fast.sampling.imageio import read_image, read_mask
from cdal_fast.weights import save_weights
from cdal_fast.wsi.readers import SlideError, open_slide
from cdal_fast.wsi.tiling import TileGrid, blend_window
from cdal_fast.wsi.tissue import otsu_threshold, tissue_mask

from .slides import write_ome_pyramid

VAL = ["TCGA-49-4488-01Z-00-DX1", "TCGA-AR-A1AS-01Z-00-DX1", "TCGA-CH-5767-01Z-00-DX1", "TCGA-G9-6336-01Z-00-DX1"]


@pytest.fixture(scope="module")
def mosaic(shared_data) -> np.ndarray:
    """2x2 mosaic of 350-px crops of real MoNuSeg tiles with a 150-px glass margin: 1000x1000."""
    img = np.full((1000, 1000, 3), 242, dtype=np.uint8)
    for i, name in enumerate(VAL):
        tile = read_image(shared_data / "monuseg" / "train" / "images" / f"{name}.tif")
        r, c = divmod(i, 2)
        img[150 + r * 350:150 + (r + 1) * 350, 150 + c * 350:150 + (c + 1) * 350] = tile[:350, :350]
    return img


def _tiny_weights(folder: Path, **overrides) -> Path:
    from cdal_fast.network.config import get_preset
    from cdal_fast.network.generator import Generator

    from .conftest import perturbed

    torch.manual_seed(0)
    save_weights(folder / "tiny", perturbed(Generator(get_preset("tiny", **overrides))).eval(), dtype=torch.float32)
    return folder / "tiny.safetensors"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    return _tiny_weights(tmp_path_factory.mktemp("w"))


@pytest.fixture(scope="module")
def slide(tmp_path_factory, mosaic) -> Path:
    return write_ome_pyramid(tmp_path_factory.mktemp("s") / "mosaic.ome.tif", mosaic, mpp=0.25, levels=3)


def run(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["segment", *args, "-q"])
    return res.exit_code, res.output


def test_reader_regions_and_metadata(slide, mosaic):
    with open_slide(slide) as s:
        assert [(lv.width, lv.height) for lv in s.levels] == [(1000, 1000), (500, 500), (250, 250)]
        assert s.mpp == pytest.approx(0.25) and s.mpp_source == "OME PhysicalSizeX"
        assert np.array_equal(s.read_region(0, 300, 260, 333, 271), mosaic[260:531, 300:633])
        edge = s.read_region(0, 900, 900, 200, 200)
        assert np.array_equal(edge[:100, :100], mosaic[900:, 900:]) and (edge[100:] == 255).all()


def test_segment_slide_outputs(tmp_path, slide, tiny_weights):
    out = tmp_path / "out"
    code, output = run([str(slide), "--out", str(out), "--weights", str(tiny_weights), "--save-prob",
                        "--save-uncertainty", "--tile-overlap", "16", "--batch-size", "16", "--workers", "1"])
    assert code == 0, output
    with tifffile.TiffFile(out / "mosaic.mask.ome.tif") as t:
        assert t.is_bigtiff and t.is_ome
        levels = t.series[0].levels
        assert levels[0].shape == (1000, 1000)  # the slide's own pixel grid
        assert len(levels) >= 2 and levels[1].shape == (500, 500)
        page = levels[0].keyframe
        assert page.is_tiled and page.compression != 1
        assert set(np.unique(levels[0].asarray())) <= {0, 255}
        assert 'PhysicalSizeX="0.25"' in t.ome_metadata
    summary = json.loads((out / "mosaic.json").read_text())
    assert summary["complete"] and summary["working_size"] == [500, 500] and summary["level_read"] == 1
    assert 0 < summary["tiles_sampled"] < summary["tiles_total"]  # the glass margin is skipped
    assert 0.4 < summary["tissue_fraction"] < 0.9
    for key in ("prob", "uncertainty", "overlay"):
        assert Path(summary["outputs"][key]).is_file()
    margin = tifffile.imread(out / "mosaic.prob.ome.tif")[:90, :90]
    assert (margin == 0).all()  # background tiles are never sampled
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial files left
    # nuclei as objects by default: GeoJSON and CSV agree with the JSON's count
    features = json.loads((out / "mosaic.nuclei.geojson").read_text())["features"]
    rows = (out / "mosaic.nuclei.csv").read_text().splitlines()[1:]
    assert len(features) == len(rows) == summary["nuclei_count"]
    assert summary["nuclei"]["params"]["prob_threshold"] == 0.5
    tissue_mm2 = summary["nuclei"]["tissue_area_um2"] / 1e6
    assert summary["nuclei_per_mm2_tissue"] == pytest.approx(summary["nuclei_count"] / tissue_mm2, rel=1e-3)

    # rerun resumes: nothing is redone (batch size and loader workers do not change the outputs)
    mtime = (out / "mosaic.mask.ome.tif").stat().st_mtime_ns
    code, output = run([str(slide), "--out", str(out), "--weights", str(tiny_weights), "--tile-overlap", "16"])
    assert code == 0 and "already complete" in output
    assert (out / "mosaic.mask.ome.tif").stat().st_mtime_ns == mtime
    # a rerun with other settings neither skips nor overwrites the finished outputs: it says what differs
    code, output = run([str(slide), "--out", str(out), "--weights", str(tiny_weights), "--threshold", "0.3",
                        "--seed", "1"])
    assert code == 1 and "OutputsFromOtherSettings" in output
    assert "threshold 0.5 -> 0.3" in output and "seed 0 -> 1" in output
    assert (out / "mosaic.mask.ome.tif").stat().st_mtime_ns == mtime
    code, output = run([str(slide), "--out", str(out), "--weights", str(tiny_weights), "--tile-overlap", "16",
                        "--threshold", "0.3", "--overwrite"])
    assert code == 0 and json.loads((out / "mosaic.json").read_text())["model"]["threshold"] == 0.3
    code, output = run([str(slide), "--out", str(out), "--weights", str(tiny_weights), "--nuclei-threshold", "1"])
    assert code == 2 and "--nuclei-threshold" in output  # a threshold of 1 would find nothing


def test_interrupted_run_is_not_complete(tmp_path, slide, tiny_weights, monkeypatch):
    from cdal_fast.wsi import pipeline

    def boom(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(pipeline, "write_pyramid", boom)
    res = CliRunner().invoke(main, ["segment", str(slide), "--out", str(out), "--weights", str(tiny_weights), "-q",
                                    "--workers", "0", "--batch-size", "16"])
    assert res.exit_code != 0  # Ctrl-C while writing
    assert not (out / "mosaic.json").exists() and not (out / "mosaic.mask.ome.tif").exists()
    monkeypatch.undo()
    code, output = run([str(slide), "--out", str(out), "--weights", str(tiny_weights), "--workers", "0",
                        "--batch-size", "16"])
    assert code == 0 and (out / "mosaic.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_bad_inputs_are_reported_and_skipped(tmp_path, slide, tiny_weights, mosaic):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "broken.tif").write_bytes(b"II*\x00garbage" * 10)
    (inputs / "notes.svs").write_bytes(b"not a slide")
    write_ome_pyramid(inputs / "nompp.ome.tif", mosaic[:300, :300], mpp=None, levels=1)
    (inputs / "good.ome.tif").write_bytes(slide.read_bytes())
    out = tmp_path / "out"
    code, output = run([str(inputs), "--out", str(out), "--weights", str(tiny_weights), "--workers", "0",
                        "--batch-size", "16"])
    assert code == 1
    assert "1 done" in output and "3 failed" in output
    assert "broken.tif" in output and "--mpp" in output
    report = json.loads((out / "run_summary.json").read_text())
    assert len(report["failed"]) == 3 and report["processed"] == 1
    with pytest.raises(SlideError, match="unsupported file type"):
        open_slide(tmp_path / "in" / "x.doc") if (tmp_path / "in" / "x.doc").write_text("x") else None


def test_png_input_gets_png_mask(tmp_path, mosaic, tiny_weights):
    from PIL import Image

    Image.fromarray(mosaic[150:450, 150:450]).save(tmp_path / "small.png")
    out = tmp_path / "out"
    code, output = run([str(tmp_path / "small.png"), "--out", str(out), "--weights", str(tiny_weights),
                        "--mpp", "0.5", "--workers", "0", "--batch-size", "16"])
    assert code == 0, output
    mask = np.asarray(Image.open(out / "small.mask.png"))
    assert mask.shape == (300, 300) and set(np.unique(mask)) <= {0, 255}


def _border_and_interior_change(prob: np.ndarray, grid: TileGrid) -> tuple[float, float]:
    """Mean |change| between adjacent columns/rows across tile borders, and inside single tiles."""
    def axis_stats(starts: list[int], diffs: np.ndarray) -> tuple[list[float], list[float]]:
        p = grid.tile
        borders = {x for x in starts[1:]} | {x + p for x in starts[:-1]}
        blended = {j for a, b in zip(starts[:-1], starts[1:]) for j in range(b, a + p)}
        border = [diffs[b - 1] for b in sorted(borders) if 0 < b <= len(diffs)]
        inner = [diffs[j] for j in range(len(diffs))
                 if j + 1 not in borders and j + 1 not in blended and j not in blended]
        return border, inner

    bx, ix = axis_stats(grid.xs, np.abs(np.diff(prob, axis=1)).mean(axis=0))
    by, iy = axis_stats(grid.ys, np.abs(np.diff(prob, axis=0)).mean(axis=1))
    return float(np.mean(bx + by)), float(np.mean(ix + iy))


def test_no_seams_at_tile_borders(tmp_path, shared_data):
    """Mean |change| of the probability map across tile borders <= across interior lines of tiles.

    The slide is tissue edge to edge (a glass margin would make the interior look smoother than it
    is). The same measure without overlap shows the step that blending removes (the test can fail).
    """
    rgb = np.concatenate([np.concatenate([read_image(shared_data / "monuseg" / "train" / "images" / f"{n}.tif")
                                          [:500, :500] for n in VAL[r * 2:r * 2 + 2]], axis=1) for r in (0, 1)])
    slide = write_ome_pyramid(tmp_path / "mosaic.ome.tif", rgb, mpp=0.25, levels=2)
    weights = _tiny_weights(tmp_path, image_size=128)  # 128-px tiles, the default quarter overlap
    stats = {}
    for ov in (32, 0):
        out = tmp_path / f"out{ov}"
        code, output = run([str(slide), "--out", str(out), "--weights", str(weights), "--save-prob",
                            "--tile-overlap", str(ov), "--no-tissue-mask", "--batch-size", "16", "--workers", "0"])
        assert code == 0, output
        prob = tifffile.imread(out / "mosaic.prob.ome.tif", series=0, level=0).astype(np.float64)
        prob = prob[::2, ::2]  # back to the 500x500 working grid (the slide grid repeats each pixel)
        stats[ov] = _border_and_interior_change(prob, TileGrid(500, 500, 128, ov))
    border, interior = stats[32]
    assert border <= interior
    hard_border, hard_interior = stats[0]
    assert hard_border > 1.2 * hard_interior


@pytest.mark.slow
def test_reproducible_across_batch_sizes_and_workers(tmp_path, slide, tiny_weights):
    masks = []
    for bs, workers in ((1, 0), (7, 2)):
        out = tmp_path / f"o{bs}"
        code, output = run([str(slide), "--out", str(out), "--weights", str(tiny_weights), "--batch-size", str(bs),
                            "--workers", str(workers), "--tile-overlap", "16"])
        assert code == 0, output
        masks.append(tifffile.imread(out / "mosaic.mask.ome.tif", series=0, level=0))
    assert (masks[0] == masks[1]).mean() >= 0.9999


@pytest.mark.slow
def test_segment_matches_eval_on_a_validation_tile(tmp_path, shared_data):
    """Shipped model with its defaults (TTA, threshold 0.4): segment's Dice on a val tile is within 0.01
    of eval's (the committed full evaluation behind the model card)."""
    name = VAL[0]
    card = Path(__file__).resolve().parents[1] / "train" / "results" / "monuseg_s_cpu_gonly2"
    rows = {r["name"]: r for r in json.loads((card / "eval_val_cpu.json").read_text())["rows"]}
    src = shared_data / "monuseg" / "train" / "images" / f"{name}.tif"
    out = tmp_path / "out"
    # 1000 px at 0.256 um/px = 512 px at the model's 0.5 um/px: the eval protocol's geometry
    code, output = run([str(src), "--out", str(out), "--mpp", "0.256", "--tile-overlap", "0", "--workers", "0",
                        "--no-tissue-mask", "--batch-size", "4"])
    assert code == 0, output
    pred = tifffile.imread(out / f"{name}.mask.ome.tif", series=0, level=0) > 0
    gt = read_mask(shared_data / "monuseg" / "train" / "masks" / f"{name}.png")
    dice, _ = dice_iou(torch.from_numpy(pred), torch.from_numpy(gt))
    assert abs(dice - rows[name]["dice"]) <= 0.01


def test_tiling_and_window():
    g = TileGrid(300, 130, 64, 16)
    assert g.xs == [0, 48, 66] and g.ys[-1] == 300 - 64
    assert TileGrid(40, 40, 64, 16).xs == [0]
    w = blend_window(64, 16)
    assert w.shape == (64, 64) and w[32, 32] == 1 and w[0, 0] == 0 and w[5, 32] > 0
    edge = blend_window(64, 16, top=False, left=False)
    assert edge[0, 0] == 1 and edge[63, 63] == 0  # image-boundary sides keep full weight
    with pytest.raises(ValueError):
        TileGrid(10, 10, 64, 64)


def test_tissue_detection(mosaic):
    m = tissue_mask(mosaic)
    assert m[500, 500] and not m[20, 20]
    assert 0.4 < m.mean() < 0.6  # 700x700 tissue in 1000x1000
    assert otsu_threshold(np.array([10] * 50 + [200] * 50)) in range(10, 200)


def test_openslide_reader(tmp_path, tiny_weights):
    """Vendor formats go through OpenSlide: a tiled TIFF named .svs, read and segmented."""
    pytest.importorskip("openslide")
    import shutil

    from cdal_fast.wsi.readers import OpenSlideSlide, TiffSlide

    sample = Path(__file__).resolve().parents[1] / "cdal_fast" / "samples" / "sample_ihc.ome.tif"
    svs = tmp_path / "scan.svs"
    shutil.copy(sample, svs)
    with open_slide(svs) as s, TiffSlide(sample) as t:
        assert isinstance(s, OpenSlideSlide)
        assert s.mpp == pytest.approx(0.5) and (s.levels[0].width, s.levels[0].height) == (512, 512)
        assert np.array_equal(s.read_region(0, 100, 50, 200, 120), t.read_region(0, 100, 50, 200, 120))
        assert (s.read_region(0, 500, 500, 30, 30)[12:, 12:] == 255).all()  # outside the scan is white
    code, output = run([str(svs), "--out", str(tmp_path / "o"), "--weights", str(tiny_weights), "--workers", "0",
                        "--batch-size", "16"])
    assert code == 0, output
    assert (tmp_path / "o" / "scan.mask.ome.tif").is_file()


def test_openslide_missing_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openslide", None)  # what Python does for a module that is not installed
    (tmp_path / "x.ndpi").write_bytes(b"0" * 100)
    with pytest.raises(SlideError, match=r"pip install 'cdal-fast\[openslide\]'"):
        open_slide(tmp_path / "x.ndpi")
