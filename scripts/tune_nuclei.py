"""Grid-search nucleus post-processing for AJI on the cached annotated *training* tiles.

Reads the maps cached by ``scripts/cache_nuclei_maps.py`` (never validation tiles), resizes each
to its XML grid, labels it for every (threshold, h) pair once and applies each minimum area to
that labelling (the area filter is per object, so this equals a full run), and prints a Markdown
table sorted by mean AJI with PQ, DQ, SQ and the object counts.

    PYTHONPATH=$PWD python scripts/tune_nuclei.py --data ../shared/data/monuseg --maps out/nuclei_maps
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from cdal_fast.atomic import atomic_output
from cdal_fast.datasets import read_split
from cdal_fast.metrics import instance_scores
from cdal_fast.nuclei.evaluation import MONUSEG_MPP, resize_prob
from cdal_fast.nuclei.groundtruth import annotation_mpp, annotation_path, read_instances
from cdal_fast.nuclei.params import NucleiParams
from cdal_fast.nuclei.separate import label_nuclei, min_area_px

THRESHOLDS = (0.4, 0.5, 0.6)
H_UM = (0.5, 0.75, 1.0, 1.5)
MIN_AREA_UM2 = (0.0, 3.0, 6.0, 10.0)
TILE_SHAPE = (1000, 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--maps", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None, help="Also write every row here.")
    ap.add_argument("--score", type=float, nargs=3, metavar=("THRESHOLD", "H_UM", "MIN_AREA_UM2"), default=None,
                    help="No search: per-tile scores of this one setting (e.g. the chosen defaults).")
    args = ap.parse_args()
    train = set(read_split(args.data, "train"))
    tiles = []
    for npz in sorted(p for p in args.maps.glob("*.npz") if not p.name.startswith(".")):  # skip partial files
        name = npz.stem
        if name not in train:
            raise SystemExit(f"{npz}: {name} is not a training tile; tuning must not see validation tiles")
        xml = annotation_path(args.data, name)
        tiles.append((name, np.load(npz)["prob"].astype(np.float32), read_instances(xml, TILE_SHAPE),
                      annotation_mpp(xml) or MONUSEG_MPP))
    print(f"{len(tiles)} training tiles: {', '.join(t[0] for t in tiles)}")
    if args.score is not None:
        score_one(tiles, NucleiParams(*args.score))
        return
    results = []
    for thr, h in itertools.product(THRESHOLDS, H_UM):
        per_tile = []
        for _name, prob, truth, mpp in tiles:
            base = label_nuclei(resize_prob(prob, TILE_SHAPE), NucleiParams(thr, h, 0.0), mpp)
            sizes = np.bincount(base.ravel())
            per_tile.append((base, sizes, truth, mpp))
        for amin in MIN_AREA_UM2:
            scores = []
            for base, sizes, truth, mpp in per_tile:
                small = sizes < min_area_px(NucleiParams(thr, h, amin), mpp)
                small[0] = False
                scores.append(instance_scores(truth, np.where(small[base], 0, base)))
            row = {"prob_threshold": thr, "marker_h_um": h, "min_area_um2": amin}
            for key in ("aji", "pq", "dq", "sq"):
                row[key] = float(np.mean([getattr(s, key) for s in scores]))
            row["n_pred"] = int(sum(s.n_pred for s in scores))
            row["n_true"] = int(sum(s.n_true for s in scores))
            results.append(row)
        print(f"thr {thr} h {h}: best AJI so far {max(r['aji'] for r in results):.4f}", flush=True)
    results.sort(key=lambda r: -r["aji"])
    print("| threshold | h (um) | min area (um^2) | AJI | PQ | DQ (= F1@0.5) | SQ | objects (pred / true) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['prob_threshold']} | {r['marker_h_um']} | {r['min_area_um2']} | {r['aji']:.4f} | {r['pq']:.4f} "
              f"| {r['dq']:.4f} | {r['sq']:.4f} | {r['n_pred']} / {r['n_true']} |")
    if args.json:
        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps({"tiles": [t[0] for t in tiles], "rows": results}, indent=1) + "\n")


def score_one(tiles: list, params: NucleiParams) -> None:
    """Markdown rows of one setting per tile and their mean."""
    print(f"{params}\n| tile | AJI | PQ | DQ (= F1@0.5) | SQ | objects (pred / true) |\n|---|---|---|---|---|---|")
    all_scores = []
    for name, prob, truth, mpp in tiles:
        s = instance_scores(truth, label_nuclei(resize_prob(prob, TILE_SHAPE), params, mpp))
        all_scores.append(s)
        print(f"| {name} | {s.aji:.4f} | {s.pq:.4f} | {s.dq:.4f} | {s.sq:.4f} | {s.n_pred} / {s.n_true} |")
    means = {k: np.mean([getattr(s, k) for s in all_scores]) for k in ("aji", "pq", "dq", "sq")}
    print(f"| mean ({len(tiles)} tiles) | {means['aji']:.4f} | {means['pq']:.4f} | {means['dq']:.4f} "
          f"| {means['sq']:.4f} | |")


if __name__ == "__main__":
    main()
