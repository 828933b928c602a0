"""Instance scores of cached distillation targets against the MoNuSeg XML nuclei (training tiles only).

    python scripts/score_targets.py --data ../shared/data/monuseg --targets runs/distill/targets

A student learns its targets' maps, so targets that split touching nuclei badly cap the student's AJI:
this scores each annotated tile's target probability the way the protocol scores a model
(:func:`cdal_fast.nuclei.evaluation.score_tile`, default nucleus parameters) and prints the mean.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from cdal_fast.datasets import resolve_2d_root
from cdal_fast.nuclei.evaluation import INSTANCE_KEYS, score_tile
from cdal_fast.nuclei.groundtruth import annotation_path
from cdal_fast.sampling.imageio import read_mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="MoNuSeg folder")
    ap.add_argument("--targets", type=Path, required=True, help="folder of NAME.safetensors targets")
    args = ap.parse_args()
    root = resolve_2d_root(args.data)
    rows = []
    for path in sorted(args.targets.glob("*.safetensors")):
        name = path.stem
        xml = annotation_path(args.data, name)
        if xml is None:
            continue
        shape = read_mask(next((root / "masks").glob(f"{name}.*"))).shape
        scores, _ = score_tile(load_file(str(path))["prob"].float()[0], xml, tuple(shape))
        rows.append({"name": name, **scores.to_dict()})
        print(json.dumps(rows[-1]), flush=True)
    if rows:
        means = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in INSTANCE_KEYS}
        print("mean over", len(rows), "tiles:", means)


if __name__ == "__main__":
    main()
