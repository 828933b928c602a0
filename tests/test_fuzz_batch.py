"""Issue 17 fuzz corpus: one `segment` batch over 30+ malformed inputs and 2 good slides.

The corpus is generated here (nothing committed). The good slides' outputs must be byte-identical
to a clean run, every bad input gets one FAIL line and one failed entry, nothing partial is left
in --out, the exit code is 1, and the peak RSS of the run is measured and bounded.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import tifffile

from .slides import write_ome_pyramid
from .test_hardening import patch_tag
from .test_segment import _tiny_weights

ROOT = Path(__file__).resolve().parents[1]
MAX_RSS_MB = 1536  # the issue's bound for a CPU run (the tiny model needs far less)
# Run a command and print the peak RSS (kB) of its process tree's largest process.
RSS_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(rc)")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, idat: bytes, crc_ok: bool = True) -> bytes:
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if not crc_ok:
        ihdr = ihdr[:-4] + b"\0\0\0\0"
    return b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _tissue(seed: int, side: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgb = np.full((side, side, 3), 240, np.uint8)
    m = side // 5
    rgb[m:side - m, m:side - m] = rng.integers(0, 40, (side - 2 * m, side - 2 * m, 1)) + np.array([170, 90, 160])
    return rgb


def make_corpus(folder: Path) -> list[Path]:
    """Malformed inputs of every kind the issue lists; returns the paths to pass (files and odd entries)."""
    folder.mkdir()
    good = write_ome_pyramid(folder / "template.ome.tif", _tissue(9, 64), mpp=0.5, levels=2, tile=16)
    good_bytes = good.read_bytes()
    with tifffile.TiffFile(good) as tif:
        offs = tif.series[0].levels[0].keyframe.tags["TileOffsets"].valueoffset
    good.unlink()
    rng = np.random.default_rng(0)
    garbage = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    files: dict[str, bytes] = {
        "empty.tif": b"", "empty.png": b"", "empty.jpg": b"", "empty.ome.tif": b"", "empty.svs": b"",
        "garbage.tif": garbage, "garbage.png": garbage, "garbage.jpeg": garbage, "garbage.btf": garbage,
        "garbage.ndpi": garbage, "tiff_magic_only.tif": b"II*\x00" + garbage[:64],
        "truncated_header.ome.tif": good_bytes[:100], "truncated_pixels.ome.tif": good_bytes[: len(good_bytes) // 3],
        "png_bomb.png": _png(100_000, 100_000, zlib.compress(b"\0" * 10_000)),
        "png_bad_crc.png": _png(8, 8, zlib.compress(b"\0" * 200), crc_ok=False),
        "png_short_idat.png": _png(64, 64, zlib.compress(b"\0" * 10)),
        "jpeg_truncated.jpg": b"\xff\xd8\xff\xe0" + garbage[:200],
        "bad_header.nii": b"\x5c\x01\x00\x00" + garbage[:400], "bad_header.nii.gz": zlib.compress(garbage),
        "unsupported.doc": b"hello",
    }
    paths = []
    for name, data in files.items():
        stem, _, ext = name.partition(".")
        unique = f"{stem}_{ext.replace('.', '')}.{ext}"  # empty.tif / empty.png would share outputs: distinct stems
        (folder / unique).write_bytes(data)
        paths.append(folder / unique)

    def variant(name: str, tag: str, value: int, level: int = 0) -> None:
        p = folder / name
        p.write_bytes(good_bytes)
        patch_tag(p, tag, value, level)
        paths.append(p)

    variant("zero_width.ome.tif", "ImageWidth", 0)
    variant("zero_height_level1.ome.tif", "ImageLength", 0, level=1)
    variant("absurd_size.ome.tif", "ImageWidth", 4_000_000_000)
    variant("header_beyond_tiles.ome.tif", "ImageLength", 6400)
    variant("levels_disagree.ome.tif", "ImageLength", 20, level=1)
    variant("level_larger.ome.tif", "ImageWidth", 128, level=1)
    variant("bad_compression.ome.tif", "Compression", 50000)
    variant("jpeg_tag_on_zlib.ome.tif", "Compression", 7)
    variant("zero_tile_size.ome.tif", "TileWidth", 0)
    p = folder / "offset_past_end.ome.tif"
    data = bytearray(good_bytes)
    data[offs:offs + 8] = struct.pack("<Q", len(good_bytes) * 10)  # BigTIFF: 8-byte offsets
    p.write_bytes(bytes(data))
    paths.append(p)
    for name, arr, kw in [("float_pixels.tif", np.zeros((64, 64), np.float32), {}),
                          ("five_channels.tif", np.zeros((64, 64, 5), np.uint8), {"photometric": "minisblack",
                                                                                  "planarconfig": "contig"}),
                          ("planar_rgb.tif", np.zeros((3, 64, 64), np.uint8), {"photometric": "rgb",
                                                                               "planarconfig": "separate"})]:
        tifffile.imwrite(folder / name, arr, resolution=(20000, 20000), resolutionunit="CENTIMETER", **kw)
        paths.append(folder / name)
    write_ome_pyramid(folder / "no_mpp.ome.tif", _tissue(3, 64), mpp=None, levels=1)
    tifffile.imwrite(folder / "anisotropic.tif", _tissue(4, 64), photometric="rgb", resolution=(20000, 10000),
                     resolutionunit="CENTIMETER")
    paths += [folder / "no_mpp.ome.tif", folder / "anisotropic.tif"]
    (folder / "folder.tif").mkdir()
    (folder / "loop.tif").symlink_to(folder / "loop.tif")
    (folder / "dangling.tif").symlink_to(folder / "missing.tif")
    unreadable = folder / "unreadable.tif"
    unreadable.write_bytes(garbage)
    unreadable.chmod(0)
    paths += [folder / "folder.tif", folder / "loop.tif", folder / "dangling.tif", unreadable]
    return paths


def _segment(inputs: list[Path], out: Path, weights: Path) -> tuple[int, str, float]:
    cmd = [sys.executable, "-c", RSS_WRAPPER, sys.executable, "-m", "cdal_fast.cli", "segment", *map(str, inputs),
           "--out", str(out), "--weights", str(weights), "--workers", "0", "--batch-size", "8",
           "--no-tissue-mask", "-q"]  # every tile is read, so malformed level-0 tiles are decoded
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    peak_kb = float(res.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return res.returncode, res.stderr, peak_kb / 1024


def _bytes(path: Path) -> bytes:
    """The file's bytes with OME's per-file random UUID blanked (same length, so nothing else moves)."""
    return re.sub(rb"urn:uuid:[0-9a-f-]{36}", b"urn:uuid:" + b"0" * 36, path.read_bytes())


def test_fuzz_corpus_in_one_batch(tmp_path):
    weights = _tiny_weights(tmp_path)
    bad = make_corpus(tmp_path / "bad")
    assert len(bad) >= 30
    good_dir = tmp_path / "good"
    good_dir.mkdir()
    good = [write_ome_pyramid(good_dir / f"good{i}.ome.tif", _tissue(i, 160), mpp=0.5, levels=2, tile=64)
            for i in range(2)]
    code, log, _ = _segment(good, tmp_path / "clean", weights)
    assert code == 0, log
    # the folder is scanned (links, loops and folders named *.tif are listed too); .doc is named directly
    named = [tmp_path / "bad", tmp_path / "bad" / "unsupported_doc.doc", *good]
    code, log, peak_mb = _segment(named, tmp_path / "out", weights)
    print(f"fuzz batch: {len(bad)} bad + 2 good inputs, peak RSS {peak_mb:.0f} MB")
    assert code == 1, log
    fail_lines = [line for line in log.splitlines() if line.startswith("FAIL")]
    missing = [p.name for p in bad if sum(line.startswith(f"FAIL  {p}:") for line in fail_lines) != 1]
    assert not missing, (missing, log)
    assert len(fail_lines) == len(bad)
    assert "Traceback" not in log  # every failure is one line; tracebacks go to the summary
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert sorted(f["file"] for f in summary["failed"]) == sorted(map(str, bad))
    assert summary["processed"] == 2 and all(f["traceback"] for f in summary["failed"])
    out_files = sorted(p.name for p in (tmp_path / "out").iterdir())
    clean_files = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert out_files == clean_files  # nothing partial, no hidden work folders or locks, nothing for bad inputs
    for name in clean_files:
        if not name.endswith((".json", ".html")):  # summaries and the report hold timings
            assert _bytes(tmp_path / "out" / name) == _bytes(tmp_path / "clean" / name), name
    assert peak_mb < MAX_RSS_MB
