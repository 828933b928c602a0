"""Issue 17 items 5-7: per-input failures, bounded allocations, unique output names (no model needed)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch

from cdal_fast.job import SegmentJob
from cdal_fast.network.config import get_preset
from cdal_fast.tasks import TASKS
from cdal_fast.wsi import batch
from cdal_fast.wsi.limits import DEFAULT_MAX_PIXELS
from cdal_fast.wsi.options import SegmentOptions
from cdal_fast.wsi.outputs import NameCollisionError, output_names, slide_stem
from cdal_fast.wsi.pipeline import make_plan
from cdal_fast.wsi.readers import Level, SlideError, TiffSlide, open_slide

from .slides import write_ome_pyramid


def patch_tag(path: Path, tag: str, value: int, level: int = 0) -> None:
    """Overwrite the (inline) value of a TIFF tag of pyramid ``level`` in place, as a hostile header would."""
    with tifffile.TiffFile(path) as tif:
        t = tif.series[0].levels[level].keyframe.tags[tag]
        offset, fmt = t.valueoffset, tif.byteorder + {3: "H", 4: "I", 16: "Q"}[t.dtype]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(fmt, value))


def small_tiled(path: Path, side: int = 64, tile: int = 16) -> Path:
    rgb = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    tifffile.imwrite(path, rgb, tile=(tile, tile), photometric="rgb")
    return path


# -- item 5: clear SlideErrors from readers, any exception reported per input ---------------------
def test_zero_width_level_is_a_slide_error(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = write_ome_pyramid(tmp_path / "zero.ome.tif", rgb, mpp=0.5, levels=2, tile=16)
    patch_tag(path, "ImageWidth", 0, level=1)  # used to be a ZeroDivisionError computing the downsample
    with pytest.raises(SlideError, match=r"zero.ome.tif: level 1 is 0x32 px"):
        open_slide(path)


def test_header_larger_than_tile_table_is_a_slide_error(tmp_path):
    path = small_tiled(tmp_path / "big.tif")
    patch_tag(path, "ImageWidth", 6400)
    with pytest.raises(SlideError, match=r"6400x64 px in 16x16 tiles, which needs 1600 entries.* 16 offsets"):
        open_slide(path)


def test_tile_past_end_of_file_is_a_slide_error(tmp_path):
    path = small_tiled(tmp_path / "cut.tif")
    data = path.read_bytes()
    with tifffile.TiffFile(path) as tif:
        last = int(max(tif.pages[0].dataoffsets)) + 1
    path.write_bytes(data[:last])  # the header and IFD come first in tifffile's layout: only pixels are cut
    with pytest.raises(SlideError, match="beyond the end of the file"):
        open_slide(path)


def _fake_run(tmp_path: Path, segment_fn) -> tuple[batch.RunReport, list[str]]:
    files = [tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "c.tif"]
    lines: list[str] = []
    orig = TASKS["monuseg"]
    TASKS["monuseg"] = orig.with_functions(segment=segment_fn, done=lambda *_: None)  # nothing complete yet
    try:
        cfg = get_preset("tiny")
        run = batch.TaskRun(SegmentJob.of(cfg, SegmentOptions()), SimpleNamespace(), None, cfg, torch.device("cpu"),
                            {})
        report = batch.segment_all(files, tmp_path / "out", run, echo=lines.append, show_progress=False)
    finally:
        TASKS["monuseg"] = orig
    return report, lines


def test_any_exception_is_reported_for_its_input_and_the_batch_goes_on(tmp_path):
    def job(path, out_dir, run, progress):
        if path.name == "a.tif":
            return 1 / 0  # the ZeroDivisionError the old readers raised on zero-width TIFFs
        if path.name == "b.tif":
            raise IndexError("tile 7")
        return {"tiles_sampled": 3, "seconds": 0.1}

    report, lines = _fake_run(tmp_path, job)
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["processed"] == 1 and summary["tiles"] == 3
    failed = {Path(f["file"]).name: f for f in summary["failed"]}
    assert failed["a.tif"]["error"].startswith("ZeroDivisionError")
    assert failed["b.tif"]["error"] == "IndexError: tile 7"
    assert "job" in failed["b.tif"]["traceback"] and "IndexError" in failed["b.tif"]["traceback"]
    assert sum(line.startswith("FAIL") for line in lines) == 2
    assert not list((tmp_path / "out").glob(".*.lock"))  # locks released after failures


def test_run_summary_is_written_when_interrupted(tmp_path):
    def job(path, out_dir, run, progress):
        if path.name == "b.tif":
            raise KeyboardInterrupt
        return {"tiles_sampled": 1, "seconds": 0.1}

    with pytest.raises(KeyboardInterrupt):
        _fake_run(tmp_path, job)
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["interrupted"] and summary["processed"] == 1


# -- item 6: allocations bounded, --mpp plausible, strips decoded once ----------------------------
class _Header:
    """A reader as a hostile header describes it (nothing is ever read)."""

    def __init__(self, side: int, mpp: float | None = 0.25) -> None:
        self.path = Path("claims.tif")
        self.levels = [Level(side, side, 1.0)]
        self.mpp, self.mpp_source, self.mpp_warning, self.mpp_anisotropic = mpp, "test", None, None


def test_huge_header_is_refused_with_the_numbers():
    cfg = get_preset("tiny")  # 0.5 um/px: a 10^6 px side at 0.25 um/px is 500000 working px
    with pytest.raises(SlideError, match=r"claims.tif.*500000 x 500000 working px.*limit is 1e\+10.*--max-pixels"):
        make_plan(_Header(10**6), cfg, None)
    plan = make_plan(_Header(10**6), cfg, None, max_pixels=3e11)  # lifted explicitly: planned, nothing allocated
    assert plan.work_w == 500_000
    assert make_plan(_Header(100_000), cfg, None).work_w == 50_000  # 100k slides stay within the default
    assert DEFAULT_MAX_PIXELS >= 50_000**2


def test_mpp_override_goes_through_the_plausibility_check():
    cfg = get_preset("tiny")
    with pytest.raises(SlideError, match=r"--mpp 50 is outside the plausible microscopy range 0.05-20"):
        make_plan(_Header(1000, mpp=None), cfg, 50.0)
    assert make_plan(_Header(1000, mpp=None), cfg, 0.25).work_w == 500


def test_flat_single_strip_tiff_is_decoded_once(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", rowsperstrip=300, compression="zlib")
    with open_slide(path) as s:
        assert isinstance(s, TiffSlide)
        for y in range(0, 300, 100):
            for x in range(0, 300, 100):
                assert np.array_equal(s.read_region(0, x, y, 100, 100), rgb[y:y + 100, x:x + 100])
        assert s.decoded == 1  # nine tiles, one strip decode (it used to be nine)


def test_oversized_strip_is_refused(tmp_path, monkeypatch):
    from cdal_fast.wsi import readers

    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.zeros((300, 300, 3), np.uint8), photometric="rgb", rowsperstrip=300)
    monkeypatch.setattr(readers, "MAX_SEGMENT_BYTES", 100_000)  # 300 x 300 x 3 = 270000 bytes
    with pytest.raises(SlideError, match=r"strips of 300 rows of 300 px decode to 0 MiB each.*tiled"):
        open_slide(path)


# -- item 7: unique output names ----------------------------------------------------------------
def test_full_stems_keep_versions_apart():
    assert slide_stem(Path("s.v1.ome.tif")) == "s.v1" and slide_stem(Path("s.v2.ome.tif")) == "s.v2"
    assert slide_stem(Path("a.b.svs")) == "a.b" and slide_stem(Path("v.nii.gz")) == "v"
    names = output_names([Path("s.v1.ome.tif"), Path("s.v2.ome.tif")])
    assert sorted(names.values()) == ["s.v1", "s.v2"]


def test_recursive_runs_keep_the_folder_structure(tmp_path):
    for sub in ("a", "b", "b/c"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / "x.svs").write_bytes(b"")
    files = batch.find_inputs([tmp_path], recursive=True)
    names = output_names(files, roots=[tmp_path])
    assert sorted(names.values()) == ["a/x", "b/c/x", "b/x"]


def test_unresolvable_collisions_are_errors_before_any_work(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "q").mkdir()
    with pytest.raises(NameCollisionError, match=r"x.tif and .*x.svs -> 'x'"):
        output_names([tmp_path / "x.tif", tmp_path / "x.svs"])
    with pytest.raises(NameCollisionError, match=r"X.svs and .*x.svs -> 'X'"):  # case-insensitive volumes
        output_names([tmp_path / "p" / "X.svs", tmp_path / "q" / "x.svs"])
    with pytest.raises(NameCollisionError, match="run summary"):
        output_names([tmp_path / "run_summary.tif"])


def test_map_file_rows_round_trip_as_npy(tmp_path):
    from cdal_fast.wsi.mapfile import MapFile

    m = MapFile.create(tmp_path / "m.npy", (5, 7))
    m[1:3] = np.arange(14, dtype=np.uint8).reshape(2, 7)
    r = MapFile.open(tmp_path / "m.npy")
    assert np.array_equal(r[np.array([2, 1])], np.arange(14, dtype=np.uint8).reshape(2, 7)[::-1])
    assert np.array_equal(np.load(tmp_path / "m.npy"), np.asarray(r)) and not np.asarray(r)[3:].any()
    with pytest.raises(ValueError, match=r"rows 0:2 need shape \(2, 7\), got \(1, 7\)"):
        m[0:2] = np.zeros((1, 7), np.uint8)
