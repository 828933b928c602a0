"""Nucleus tables at slide scale (issue 36 item 4): write time, file size and peak memory of the
GeoJSON, CSV and GeoParquet writers for a slide of 1 million (or more) nuclei.

The nuclei are real measurements: a generated 1024 x 1024 px H-DAB image of ~600 elliptical nuclei
(random sizes, orientations, stain concentrations) is labelled and measured once by the package's
own code (:func:`cdal_fast.nuclei.bands.label_image`, stain measurements included); the slide is
that image repeated on a grid, so each nucleus streamed to the writers is one of those, moved to its
tile and given its slide-wide id (as the band labeller hands them over). Each format is written by
:class:`cdal_fast.nuclei.writers.NucleiWriters` alone, in its own process (a fresh peak RSS), with
H-DAB stain columns and IHC classes. ``stream`` is the same process with no file (the generator's
own cost): the writers' time is each row's seconds minus it.

    python bench/nuclei_table_scale.py                      # 1,000,000 nuclei, all formats
    python bench/nuclei_table_scale.py --count 100000       # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("stream", "geojson", "csv", "parquet")
TEMPLATE_SIDE = 1024  # px at 0.5 um/px: one repeat of the generated slide


def _rss_kb(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def templates(seed: int = 0):
    """The measured nuclei of one generated H-DAB image (real outlines, shapes and stain values)."""
    from cdal_fast.nuclei.bands import label_image
    from cdal_fast.nuclei.measure import Grid
    from cdal_fast.nuclei.params import NucleiParams
    from cdal_fast.nuclei.stain import default_profile

    rng = np.random.default_rng(seed)
    prof = default_profile("h-dab")
    side = TEMPLATE_SIDE
    prob = np.zeros((side, side), np.float32)
    rgb = np.full((side, side, 3), 235, np.uint8)
    yy, xx = np.mgrid[:side, :side]
    vec = np.asarray(prof.vectors)
    for cy in range(20, side - 20, 40):
        for cx in range(20, side - 20, 40):
            a, b, t = rng.uniform(5, 12), rng.uniform(4, 9), rng.uniform(0, np.pi)
            dy, dx = yy[cy - 16:cy + 16, cx - 16:cx + 16] - cy, xx[cy - 16:cy + 16, cx - 16:cx + 16] - cx
            u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
            inside = (u / a) ** 2 + (v / b) ** 2 <= 1
            prob[cy - 16:cy + 16, cx - 16:cx + 16][inside] = rng.uniform(0.6, 1.0)
            od = np.array([rng.uniform(0.2, 0.8), rng.uniform(0.0, 0.9)]) @ vec
            rgb[cy - 16:cy + 16, cx - 16:cx + 16][inside] = np.clip(255 * 10 ** (-od), 0, 255).astype(np.uint8)
    std = prob * 0.1
    return label_image(prob, std, NucleiParams(), Grid(0.5, 2.0), rgb=rgb, stain=prof), prof


def stream(tmpl, count: int):
    """``count`` nuclei: the templates repeated over a square grid of tiles, ids 1..count."""
    per_row = int(np.ceil(np.sqrt(count / len(tmpl))))
    shift = TEMPLATE_SIDE * 2.0  # level-0 px per template tile (scale 2)
    for k in range(count):
        n = tmpl[k % len(tmpl)]
        rep = k // len(tmpl)
        dx, dy = (rep % per_row) * shift, (rep // per_row) * shift
        yield replace(n, id=k + 1, centroid_x_px=n.centroid_x_px + dx, centroid_y_px=n.centroid_y_px + dy,
                      centroid_x_um=n.centroid_x_um + dx * 0.25, centroid_y_um=n.centroid_y_um + dy * 0.25,
                      polygon=tuple((x + dx, y + dy) for x, y in n.polygon))


def child(fmt: str, count: int, out: Path) -> dict:
    from cdal_fast.nuclei.stain import PositivityRule
    from cdal_fast.nuclei.writers import NucleiWriters

    tmpl, prof = templates()
    baseline = _rss_kb()
    t0 = time.perf_counter()
    writers = NucleiWriters(out, "slide", geojson=fmt == "geojson", csv_table=fmt == "csv", stain=prof,
                            positivity=PositivityRule(), parquet=fmt == "parquet")
    batch: list = []
    with writers:
        for n in stream(tmpl, count):
            batch.append(n)
            if len(batch) == 256:  # the labeller hands nuclei over per band, in lists
                writers.write(batch)
                batch = []
        writers.write(batch)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in writers.paths)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"format": fmt, "nuclei": count, "templates": len(tmpl), "seconds": seconds, "bytes": size,
            "peak_rss_mb": peak / 1024, "rss_before_writing_mb": baseline / 1024,
            "files": [p.name for p in writers.paths]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    ap.add_argument("--child", choices=FORMATS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.count, args.dir)))
        return
    load_before = [round(v, 2) for v in os.getloadavg()]
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for fmt in args.formats:
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run([sys.executable, __file__, "--child", fmt, "--count", str(args.count), "--dir", tmp],
                                 capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = next((r["seconds"] for r in rows if r["format"] == "stream"), 0.0)
    for r in rows:
        r["writer_seconds"] = max(0.0, r["seconds"] - base) if r["format"] != "stream" else 0.0
        r["size_mb"] = r["bytes"] / 1e6
        r["bytes_per_nucleus"] = r["bytes"] / r["nuclei"]
        r["nuclei_per_s"] = r["nuclei"] / r["writer_seconds"] if r["writer_seconds"] else None
    sys.path.insert(0, str(REPO))
    from bench.common import write_results

    note = (f"{args.count:,} nuclei (H-DAB stain columns and IHC class; {rows[0]['templates']} measured template "
            "nuclei repeated over a grid), each format by NucleiWriters alone in a fresh process. seconds: the "
            "whole stream; writer_seconds: minus the stream alone (row `stream`, no file). peak_rss_mb: the "
            "process's peak; rss_before_writing_mb: after imports and the templates. "
            f"Load average (1/5/15 min) before {load_before}, after {[round(v, 2) for v in os.getloadavg()]} on "
            f"{os.cpu_count()} CPUs (a shared machine: other jobs ran alongside).")
    cols = ["format", "nuclei", "seconds", "writer_seconds", "nuclei_per_s", "size_mb", "bytes_per_nucleus",
            "peak_rss_mb", "rss_before_writing_mb"]
    write_results("nuclei_table_scale", rows, cols, args.out, note=note)


if __name__ == "__main__":
    main()
