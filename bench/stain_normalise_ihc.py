"""Stain normalisation on the bundled IHC sample (issue 36 item 5): the shipped model with and without
``--stain-normalise`` on the same slide, same seed.

The sample has no annotation, so what is compared is what the model does: how many nuclei it finds,
how much of the slide it calls nucleus, how sure it is (the mean vote standard deviation inside the
nuclei, and the mean probability), and the IHC numbers measured on the slide's own pixels (H-DAB).
The validation Dice with and without normalisation is measured by ``cdal-fast eval --split val
[--stain-normalise]`` (docs/nuclei.md).

    python bench/stain_normalise_ihc.py                  # the bundled sample, CPU
    python bench/stain_normalise_ihc.py --image my.ome.tif
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from cdal_fast.wsi.outputs import slide_stem

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "cdal_fast" / "samples" / "sample_ihc.ome.tif"


def run(image: Path, out: Path, normalise: bool) -> dict:
    cmd = [sys.executable, "-m", "cdal_fast.cli", "segment", str(image), "--out", str(out), "--stain", "h-dab",
           "--device", "cpu", "--no-report", "-q"] + (["--stain-normalise"] if normalise else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    stem = slide_stem(image)
    summary = json.loads((out / f"{stem}.json").read_text())
    with open(out / f"{stem}.nuclei.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    unc = np.array([float(r["mean_uncertainty"]) for r in rows]) if rows else np.zeros(0)
    prob = np.array([float(r["mean_probability"]) for r in rows]) if rows else np.zeros(0)
    pos = summary.get("positivity") or {}
    return {"stain_normalise": normalise, "nuclei": summary["nuclei_count"],
            "object_fraction": summary["object_fraction"],
            "nucleus_mean_vote_std": float(unc.mean()) if unc.size else None,
            "nucleus_mean_probability": float(prob.mean()) if prob.size else None,
            "median_area_um2": (summary.get("nucleus_area_um2_quartiles") or [None, None])[1],
            "positive_percent": pos.get("positive_percent"), "h_score": pos.get("h_score"),
            "seconds": summary["seconds"], "warnings": "; ".join(summary.get("warnings") or [])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, default=SAMPLE)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    rows = []
    for normalise in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(args.image, Path(tmp), normalise))
            print(rows[-1], flush=True)
    sys.path.insert(0, str(REPO))
    from bench.common import write_results

    note = (f"{args.image.name}, shipped model (T = 4, V = 5, TTA, seed 0), --stain h-dab; the slide has no "
            "annotation: these are the model's own numbers (count, nucleus fraction, confidence) and the IHC "
            "numbers, which are measured on the slide's own pixels either way.")
    write_results("stain_normalise_ihc", rows, list(rows[0]), args.out, note=note)


if __name__ == "__main__":
    main()
