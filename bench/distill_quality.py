"""A one-pass student against its diffusion teacher on whole validation tiles through ``segment``.

    python bench/distill_quality.py --data ../shared/data/monuseg --student runs/monuseg_fast/best

Each MoNuSeg *validation* tile (1000 x 1000 at 0.25 um/px) is segmented whole by the command line
with the teacher (the shipped model and its defaults) and with the student (``--weights``), both
saving their probability and uncertainty maps. Per model: Dice of the mask against the ground truth
at the tile's grid (mean over tiles), sampling seconds per tile (the slides' JSON) and nuclei; for
the student also the per-pixel Pearson correlation of its uncertainty map with the teacher's vote
spread, and the mean absolute difference of the probability maps.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from cdal_fast.datasets import find_pairs, read_split, resolve_2d_root
from cdal_fast.sampling.imageio import read_mask

try:
    from bench.common import write_results
    from bench.seam_accuracy import segment
except ImportError:  # run as a script
    from common import write_results
    from seam_accuracy import segment

COLUMNS = ["model", "dice", "dice_min", "sampler_s_per_tile", "tiles", "nuclei", "uncertainty_r", "prob_mae"]
MAPS = ["--save-prob", "--save-uncertainty"]


def maps(summary: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out = summary["outputs"]
    mask = tifffile.imread(out["mask"]) > 127
    prob = tifffile.imread(out["prob"]).astype(np.float32) / 255
    unc = tifffile.imread(out["uncertainty"]).astype(np.float32) / 255
    return mask, prob, unc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--student", type=Path, required=True, help="the student's weights (NAME without extension)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default="distill_quality")
    args = ap.parse_args()
    root = resolve_2d_root(args.data)
    pairs = find_pairs(root, read_split(root, "val"))
    acc = {m: {"dice": [], "s": 0.0, "tiles": 0, "nuclei": 0} for m in ("teacher", "student")}
    xs, ys, diffs = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, ip, mp) in enumerate(pairs):
            truth = read_mask(mp)
            runs = {"teacher": segment(ip, Path(tmp) / f"t{k}", MAPS),
                    "student": segment(ip, Path(tmp) / f"s{k}", [*MAPS, "--weights", str(args.student)])}
            got = {m: maps(s) for m, s in runs.items()}
            for m, s in runs.items():
                mask = got[m][0]
                acc[m]["dice"].append(2 * (mask & truth).sum() / max(int(mask.sum() + truth.sum()), 1))
                acc[m]["s"] += s["sampler_seconds"]
                acc[m]["tiles"] += s["tiles_sampled"]
                acc[m]["nuclei"] += s.get("nuclei_count") or 0
            xs.append(got["teacher"][2].ravel())
            ys.append(got["student"][2].ravel())
            diffs.append(np.abs(got["teacher"][1] - got["student"][1]).mean())
            print(f"[{k + 1}/{len(pairs)}] {name}", flush=True)
    r = float(np.corrcoef(np.concatenate(xs), np.concatenate(ys))[0, 1])
    rows = [{"model": m, "dice": float(np.mean(a["dice"])), "dice_min": float(np.min(a["dice"])),
             "sampler_s_per_tile": a["s"] / max(a["tiles"], 1), "tiles": a["tiles"], "nuclei": a["nuclei"]}
            for m, a in acc.items()]
    rows[1].update({"uncertainty_r": r, "prob_mae": float(np.mean(diffs))})
    note = (f"{len(pairs)} val tiles, whole through segment (--mpp 0.25); teacher = the shipped model with its "
            f"defaults; student = {args.student}; uncertainty_r: per-pixel Pearson r of the student's uncertainty "
            "with the teacher's vote spread over all val pixels")
    write_results(args.name, rows, COLUMNS, args.out, note=note)


if __name__ == "__main__":
    main()
