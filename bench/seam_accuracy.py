"""Accuracy and seams of ``segment`` tiling settings on whole validation tiles.

    python bench/seam_accuracy.py --data ../shared/data/monuseg --settings overlap64="" overlap0="--tile-overlap 0"

Each of the 6 MoNuSeg *validation* tiles (1000 x 1000 at 0.25 um/px, 40x) is segmented whole by the
command line (``--mpp 0.25``: the files carry no resolution), once per setting and once with a
reference tiling (``--tile-overlap`` of half a tile, so every pixel is blended from several tiles).
Per setting:

* ``dice``: the mask against the ground truth at the tile's own 1000 x 1000 grid, mean over tiles
  (the accuracy rule compares this with the default's);
* ``seam_ratio``: the mean absolute difference of the probability map from the reference's, in a
  band of +-``--band`` working pixels around the setting's own tile borders (with shifted tiling, the
  cell borders of every vote's grid), divided by the same
  inside the tiles. A tiling without seams shows no more disagreement at its borders than
  elsewhere (ratio about 1); visible seams raise it.
* seconds of sampling (the slides' JSON) and tiles sampled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from cdal_fast.datasets import find_pairs, read_split, resolve_2d_root
from cdal_fast.models import load_model
from cdal_fast.sampling.imageio import read_mask
from cdal_fast.wsi.tiling import TileGrid, vote_grids

try:
    from bench.common import write_results
except ImportError:  # run as a script
    from common import write_results

REPO = Path(__file__).resolve().parents[1]
MONUSEG_MPP = 0.25
COLUMNS = ["setting", "args", "dice", "dice_min", "seam_ratio", "border_err", "interior_err", "tiles", "sampler_s"]


def segment(image: Path, out: Path, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "cdal_fast.cli", "segment", str(image), "--out", str(out), "--mpp", str(MONUSEG_MPP),
           "--save-prob", "--no-nuclei", "-q", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0:
        raise RuntimeError(f"segment {' '.join(args)} failed: {proc.stderr.strip()[-400:]}")
    return json.loads((out / f"{image.stem}.json").read_text())


def border_band(shape: tuple[int, int], summary: dict, tile: int, band: int) -> np.ndarray:
    """True within ``band`` working pixels of an inner border of the setting's tiling: the blended
    grid's tile borders, or with shifted tiling the cell borders of every vote's grid."""
    mask = np.zeros(shape, bool)

    def mark(ys: set[int], xs: set[int]) -> None:
        for y in ys:
            if 0 < y < shape[0]:
                mask[max(0, y - band):y + band, :] = True
        for x in xs:
            if 0 < x < shape[1]:
                mask[:, max(0, x - band):x + band] = True

    overlap = summary["tile_overlap"]
    if summary.get("tiling") == "shifted":
        for g in vote_grids(shape[0], shape[1], tile, overlap, summary["votes"]):
            mark({c0 for _, c0, _ in g.rows_layout}, {c0 for _, c0, _ in g.cols_layout})
    else:
        grid = TileGrid(shape[0], shape[1], tile, overlap)
        mark({y for t in grid.ys for y in (t, t + tile)}, {x for t in grid.xs for x in (t, t + tile)})
    return mask


def read_level0(path: Path) -> np.ndarray:
    return tifffile.imread(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--settings", nargs="+", required=True, metavar="NAME=ARGS")
    ap.add_argument("--band", type=int, default=6, help="half width of the border band, working pixels")
    ap.add_argument("--limit", type=int, default=None, help="only the first N validation tiles")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default="seam_accuracy")
    args = ap.parse_args()
    tile = load_model().config.image_size
    root = resolve_2d_root(args.data)
    pairs = find_pairs(root, read_split(root, "val"))[: args.limit]
    settings = [(s.split("=", 1)[0], s.split("=", 1)[1].split()) for s in args.settings]
    ref_args = ["--tile-overlap", str(tile // 2)]
    rows: dict[str, dict] = {name: {"setting": name, "args": " ".join(a), "dices": [], "b": [], "i": [], "tiles": 0,
                                    "sampler_s": 0.0} for name, a in settings}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, ip, mp) in enumerate(pairs):
            truth = read_mask(mp)
            ref = segment(ip, Path(tmp) / f"ref{k}", ref_args)
            ref_prob = read_level0(Path(ref["outputs"]["prob"])).astype(np.float32) / 255
            for label, extra in settings:
                s = segment(ip, Path(tmp) / f"{label}{k}", extra)
                mask = read_level0(Path(s["outputs"]["mask"])) > 127
                prob = read_level0(Path(s["outputs"]["prob"])).astype(np.float32) / 255
                r = rows[label]
                r["dices"].append(2 * (mask & truth).sum() / max(int(mask.sum() + truth.sum()), 1))
                scale = prob.shape[0] / s["working_size"][1]  # level-0 pixels per working pixel
                band = border_band(tuple(s["working_size"][::-1]), s, tile, args.band)
                band = np.kron(band, np.ones((round(scale), round(scale)), bool))[: prob.shape[0], : prob.shape[1]]
                err = np.abs(prob - ref_prob)
                r["b"].append(float(err[band].mean()))
                r["i"].append(float(err[~band].mean()))
                r["tiles"] += s["tiles_sampled"]
                r["sampler_s"] += s["sampler_seconds"]
            print(f"[{k + 1}/{len(pairs)}] {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out_rows = []
    for r in rows.values():
        b, i = float(np.mean(r["b"])), float(np.mean(r["i"]))
        out_rows.append({"setting": r["setting"], "args": r["args"], "dice": float(np.mean(r["dices"])),
                         "dice_min": float(np.min(r["dices"])), "seam_ratio": b / i if i else None, "border_err": b,
                         "interior_err": i, "tiles": r["tiles"], "sampler_s": r["sampler_s"]})
    note = (f"{len(pairs)} val tiles ({', '.join(p[0] for p in pairs)}), whole through segment at --mpp {MONUSEG_MPP}; "
            f"reference tiling --tile-overlap {tile // 2}; border band +-{args.band} working px")
    write_results(args.name, out_rows, COLUMNS, args.out, note=note)


if __name__ == "__main__":
    main()
