"""Issue 36 item 3: the batch QC report (OUT/report.html), from real batch runs, and in a real headless browser."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cdal_fast.job import SegmentJob
from cdal_fast.network.config import get_preset
from cdal_fast.wsi.batch import InputOutcome, RunReport, TaskRun, segment_all
from cdal_fast.wsi.options import SegmentOptions
from cdal_fast.wsi.report import report_name

from .slides import write_ome_pyramid
from .test_segment_nuclei import DarkIsNucleus, disc_image
from .test_stain import MPP0, SAMPLE, constructed_slide

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _batch(folder: Path, out: Path, report: bool = True):
    """A real batch: a constructed IHC slide, a PNG tile and a file that is not an image."""
    inputs = [write_ome_pyramid(folder / "ihc.ome.tif", constructed_slide(), mpp=MPP0, levels=2),
              folder / "tile.png", folder / "broken.tif"]
    if not inputs[1].exists():
        Image.fromarray(disc_image()).save(inputs[1], dpi=(25400 / MPP0, 25400 / MPP0))
        inputs[2].write_bytes(b"this is not a TIFF file")
    cfg = get_preset("tiny")
    opts = SegmentOptions(batch_size=4, workers=0, tile_overlap=16, tissue=False, stain="h-dab", report=report)
    job = SegmentJob.of(cfg, opts, steps=DarkIsNucleus.num_steps, votes=DarkIsNucleus.votes)
    run = TaskRun(job, DarkIsNucleus(), None, job.decoding_config(cfg), torch.device("cpu"), job.model_record())
    return inputs, segment_all(inputs, out, run, echo=lambda m: None, show_progress=False)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    out = folder / "out"
    inputs, report = _batch(folder, out)
    return folder, out, inputs, report


def _rows(page: str) -> list[str]:
    return re.findall(r'<tr id="input-\d+".*?</tr>', page, flags=re.S)


def test_report_has_every_input_with_its_failure_and_is_self_contained(batch):
    _, out, inputs, report = batch
    page = (out / "report.html").read_text()
    rows = _rows(page)
    assert len(rows) == len(inputs) == 3
    assert [len(report.done), len(report.failed)] == [2, 1]
    failure = json.loads((out / "run_summary.json").read_text())["failed"][0]
    assert failure["file"].endswith("broken.tif")
    broken_row = next(r for r in rows if "broken.tif" in r)
    assert "FAILED" in broken_row and html.escape(failure["error"]) in broken_row
    ihc_row = next(r for r in rows if "ihc.ome.tif" in r)
    assert ihc_row.count("data:image/") == 3  # overlay, density and uncertainty heatmaps
    assert "H-score" in ihc_row and "150" in ihc_row and "75 %" in ihc_row  # 2 nuclei of each class
    summary = json.loads((out / "ihc.json").read_text())
    assert f"{summary['nuclei_count']:,}" in ihc_row
    for role in ("qc_density", "qc_uncertainty"):
        assert Path(summary["outputs"][role]).is_file()
    # one file, nothing fetched: no scripts, no links or sources outside the page, no reload once finished
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:|#)', page)
    assert 'http-equiv="refresh"' not in page and "finished" in page


def test_a_rerun_shows_earlier_results_as_complete(batch):
    folder, out, inputs, _ = batch
    _, again = _batch(folder, out)
    assert len(again.skipped) == 2 and len(again.failed) == 1
    rows = _rows((out / "report.html").read_text())
    assert sum("complete (earlier run)" in r for r in rows) == 2
    assert all(r.count("data:image/") == 3 for r in rows if "complete (earlier run)" in r)


def test_the_report_is_rewritten_as_each_input_finishes(batch, tmp_path):
    _, out, inputs, _ = batch
    names = {p: p.name.split(".")[0] for p in inputs}
    shutil.copy(out / "ihc.json", tmp_path / "ihc.json")
    for suffix in (".overlay.png", ".qc_density.png", ".qc_uncertainty.png"):
        shutil.copy(out / f"ihc{suffix}", tmp_path / f"ihc{suffix}")
    rep = RunReport.for_batch(tmp_path, inputs, names, SegmentOptions(), "run_summary.shard-1-of-3.json")
    page_path = tmp_path / report_name("run_summary.shard-1-of-3.json")
    assert page_path.name == "report.shard-1-of-3.html"
    first = page_path.read_text()
    assert first.count(">pending<") == 3 and 'http-equiv="refresh"' in first
    rep.add(InputOutcome(str(inputs[2]), "failed", error="SlideError: <unreadable> & broken"), echo=lambda m: None)
    second = page_path.read_text()
    assert "SlideError: &lt;unreadable&gt; &amp; broken" in second and second.count(">pending<") == 2
    rep.add(InputOutcome(str(inputs[0]), "done", summary=json.loads((tmp_path / "ihc.json").read_text())),
            echo=lambda m: None)
    third = page_path.read_text()
    assert third.count(">pending<") == 1 and third.count("data:image/") == 3
    rep.finish(0.0, tmp_path / "run_summary.shard-1-of-3.json")
    assert 'http-equiv="refresh"' not in page_path.read_text()
    assert not (tmp_path / "report.html").exists()
    quiet = tmp_path / "quiet"
    RunReport.for_batch(quiet, inputs, names, SegmentOptions(report=False))
    assert not quiet.exists()


def _browser() -> str | None:
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    return None


def test_the_report_renders_in_a_headless_browser(batch, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium / chrome binary on PATH (scripts/setup.sh installs Debian's chromium where it can)")
    _, out, _, _ = batch
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    url = (out / "report.html").resolve().as_uri()
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1400,1000", url],
                   capture_output=True, timeout=180, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1000, 1400)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # rendered images, not a blank
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    assert dom.count('<tr id="input-') == 3 and "FAILED" in dom and "H-score" in dom


@pytest.mark.slow
def test_segment_on_the_bundled_sample_writes_positivity_and_the_report(tmp_path):
    from cdal_fast.cli import main

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["segment", str(SAMPLE), "--out", str(out), "--stain", "h-dab", "--votes", "1",
                                    "--backend", "eager", "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "sample_ihc.json").read_text())
    pos = summary["positivity"]
    assert sum(pos["counts"].values()) == summary["nuclei_count"] > 0
    assert pos["h_score"] is not None and pos["per_mm2_tissue"] is not None
    row = _rows((out / "report.html").read_text())[0]
    assert "sample_ihc" in row and "H-score" in row and row.count("data:image/") == 3


def test_qc_heatmaps_count_nuclei_and_uncertainty_per_sampled_cell():
    from cdal_fast.wsi.qc import QcMaps, colourise
    from cdal_fast.wsi.tiling import Coverage, TileGrid

    grid = TileGrid(300, 400, 64, 0)
    tiles = [t for t in grid.iter_tiles() if t.row < 2]  # rows 0-127 sampled, the rest never reached
    cov = Coverage(300, 400, 64, tiles)
    qc = QcMaps.for_map(300, 400, 0.5)  # 25 um cells: 50 px
    assert qc.cell == 50 and qc.shape == (6, 8)
    std = np.zeros((300, 400), np.float32)
    std[:, 100:150] = 0.2
    for y in range(0, 300, 64):  # bands of any height, as the nucleus step reads them
        qc.add_band(y, std[y:y + 64, 30:], 30, cov)  # the crop starts at column 30
    for x, y in [(10, 10), (20, 30), (120, 60), (399, 120)]:
        qc.add_nucleus(x, y)
    dens, unc = qc.density_per_mm2(), qc.mean_uncertainty()
    cell_mm2 = 50 * 50 * 0.25 / 1e6
    assert np.isnan(dens[0, 0])  # columns 0-29 were not fed: 40 % of the cell sampled, drawn grey
    assert dens[1, 2] == pytest.approx(1 / cell_mm2) and dens[0, 2] == 0
    assert unc[0, 2] == pytest.approx(0.2) and unc[0, 1] == pytest.approx(0.0)
    assert np.isnan(dens[3:]).all() and np.isnan(unc[3:]).all()  # never sampled
    rgb = colourise(np.array([[0.0, 0.5, 1.0, np.nan]]), 1.0)
    lightness = rgb[0, :3].astype(int).sum(axis=1)
    assert lightness[0] < lightness[1] < lightness[2] and tuple(rgb[0, 3]) == (225, 225, 225)
