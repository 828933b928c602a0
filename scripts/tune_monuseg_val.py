"""Validation study of the inference-side levers of the shipped MoNuSeg model (issue 24, levers 2 and 5).

Stage ``sample`` runs the shipped model on the ``val`` tiles by the section-8 protocol (tile -> 512 ->
four 256 patches, T and V of the model, position-keyed noise from ``--seed``), once without and once
with test-time augmentation, and caches each tile's vote-averaged probability map and its 512x512
target as ``CACHE/{plain,tta}/NAME.npz``. Sampling is the slow part (about 10 min per pass on a
2-core CPU), so it is done once; tiles already cached are skipped.

Stage ``sweep`` then scores, offline, every combination of decision threshold, hole filling and
minimum object size (:mod:`cdal_fast.sampling.postprocess`; ``segment`` and ``eval`` apply the chosen threshold
through :mod:`cdal_fast.sampling.decode`, the clean-up was not adopted) and
writes the table of validation Dice/IoU per setting as JSON and Markdown into ``--results``.

    nice -n 19 env PYTHONPATH=$PWD python scripts/tune_monuseg_val.py --data ../shared/data/monuseg
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from cdal_fast.atomic import atomic_output
from cdal_fast.datasets import find_pairs, read_split, resolve_2d_root
from cdal_fast.metrics import dice_iou
from cdal_fast.models import load_model
from cdal_fast.sampling.imageio import read_image, read_mask, resize_mask
from cdal_fast.sampling.inference import PatchRunner, predict_monuseg_tile
from cdal_fast.sampling.postprocess import PostProcess, postprocess_mask
from cdal_fast.sampling.preprocess import match_channels, to_chw_float
from cdal_fast.sampling.sampler import FixedStepSampler

VARIANTS = {"plain": False, "tta": True}  # cache folder -> test-time augmentation on
THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
FILL_HOLES = (0, 16, 64)  # largest hole filled, in work-grid pixels (0: off)
MIN_OBJECTS = (0, 8, 16, 32, 64)  # smallest object kept, in work-grid pixels (0: off)
BATCH = 4  # patches per sampler call (the eval default; results do not depend on it)
DEFAULT_CACHE = Path("out/monuseg_val_maps")
DEFAULT_RESULTS = Path("train/results/monuseg_inference_levers")


def sample_stage(data: Path, cache: Path, seed: int, split: str) -> None:
    """Cache the vote-mean map of every ``split`` tile, without and with TTA."""
    bundle = load_model(task="monuseg")
    cfg = bundle.config
    root = resolve_2d_root(data)
    pairs = find_pairs(root, read_split(root, split))
    runners = {variant: PatchRunner(FixedStepSampler(bundle.generator, tta=tta).eval(), batch_size=BATCH, seed=seed)
               for variant, tta in VARIANTS.items()}
    # tile-major: a pass cut short still leaves paired (plain, tta) maps of the tiles it reached
    for name, image_path, mask_path in pairs:
        for variant, runner in runners.items():
            dest = cache / variant / f"{name}.npz"
            if dest.exists():
                continue
            t0 = time.perf_counter()
            img = match_channels(to_chw_float(read_image(image_path)), cfg.img_channels)
            prob = predict_monuseg_tile(img, cfg, runner)
            target = resize_mask(torch.from_numpy(read_mask(mask_path)), prob.shape[-1])
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(dest) as tmp, open(tmp, "wb") as fh:
                np.savez_compressed(fh, prob=prob.numpy().astype(np.float32), target=target.numpy().astype(np.uint8))
            d, _ = dice_iou(prob >= 0.5, target)
            print(f"{variant} {name}: dice@0.5 {d:.4f}  {time.perf_counter() - t0:.1f} s", flush=True)


def _score(maps: list[tuple[np.ndarray, np.ndarray]], post: PostProcess) -> tuple[list[float], list[float]]:
    dices, ious = [], []
    for prob, target in maps:
        mask = postprocess_mask(prob >= post.threshold, post)
        d, i = dice_iou(torch.from_numpy(mask), torch.from_numpy(target))
        dices.append(d)
        ious.append(i)
    return dices, ious


def sweep_stage(cache: Path, results: Path, names: list[str]) -> list[dict]:
    """Score every setting on the cached maps; write ``sweep.json`` and ``sweep.md`` into ``results``.

    Only tiles cached in every variant are scored (a sampling pass cut short leaves a paired subset);
    the files say which.
    """
    names = [n for n in names if all((cache / v / f"{n}.npz").exists() for v in VARIANTS)]
    if not names:
        raise SystemExit(f"no tile of the split is cached in every variant under {cache}; run --stage sample")
    rows = []
    for variant in VARIANTS:
        maps = []
        for name in names:
            with np.load(cache / variant / f"{name}.npz") as z:
                maps.append((z["prob"], z["target"].astype(bool)))
        for thr, holes, min_obj in itertools.product(THRESHOLDS, FILL_HOLES, MIN_OBJECTS):
            post = PostProcess(threshold=thr, fill_holes_px=holes, min_object_px=min_obj)
            dices, ious = _score(maps, post)
            rows.append({"tta": VARIANTS[variant], "threshold": thr, "fill_holes_px": holes,
                         "min_object_px": min_obj, "dice": float(np.mean(dices)), "iou": float(np.mean(ious)),
                         "tile_dice": dices, "tile_iou": ious})
    results.mkdir(parents=True, exist_ok=True)
    with atomic_output(results / "sweep.json") as tmp:
        tmp.write_text(json.dumps({"names": names, "rows": rows}, indent=1) + "\n")
    lines = ["| TTA | threshold | fill holes (px) | min object (px) | Dice | IoU |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["dice"]):
        lines.append(f"| {'on' if r['tta'] else 'off'} | {r['threshold']:.2f} | {r['fill_holes_px']} | "
                     f"{r['min_object_px']} | {r['dice']:.4f} | {r['iou']:.4f} |")
    with atomic_output(results / "sweep.md") as tmp:
        tmp.write_text(f"# Validation sweep (all settings, best first; {len(names)} tiles: {', '.join(names)})\n\n"
                       + "\n".join(lines) + "\n")
    best = max(rows, key=lambda r: r["dice"])
    print("best:", {k: v for k, v in best.items() if not k.startswith("tile_")})
    _write_summary(results, names, rows)
    return rows


def _write_summary(results: Path, names: list[str], rows: list[dict]) -> None:
    """Per-tile Dice of the plain protocol, TTA alone, and the best setting of each variant."""
    def pick(tta: bool, **fixed: float) -> dict:
        cands = [r for r in rows if r["tta"] is tta and all(r[k] == v for k, v in fixed.items())]
        return max(cands, key=lambda r: r["dice"])

    plain = {"threshold": 0.5, "fill_holes_px": 0, "min_object_px": 0}
    chosen = {"protocol (no TTA, 0.5, no clean-up)": pick(False, **plain), "TTA only": pick(True, **plain),
              "best threshold, no TTA, no clean-up": pick(False, fill_holes_px=0, min_object_px=0),
              "best threshold, TTA, no clean-up": pick(True, fill_holes_px=0, min_object_px=0),
              "best without TTA": pick(False), "best with TTA": pick(True)}
    lines = [f"# Inference levers on validation ({len(names)} tiles)", "",
             "| setting | TTA | threshold | fill holes | min object | Dice | IoU | " + " | ".join(names) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(names)]
    for label, r in chosen.items():
        lines.append(f"| {label} | {'on' if r['tta'] else 'off'} | {r['threshold']:.2f} | {r['fill_holes_px']} | "
                     f"{r['min_object_px']} | {r['dice']:.4f} | {r['iou']:.4f} | "
                     + " | ".join(f"{d:.4f}" for d in r["tile_dice"]) + " |")
    with atomic_output(results / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_output(results / "summary.json") as tmp:
        tmp.write_text(json.dumps({"names": names, "settings": chosen}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--stage", choices=("sample", "sweep", "all"), default="all")
    ap.add_argument("--split", default="val")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="Git-ignored folder of the cached maps.")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.stage in ("sample", "all"):
        sample_stage(args.data, args.cache, args.seed, args.split)
    if args.stage in ("sweep", "all"):
        sweep_stage(args.cache, args.results, read_split(resolve_2d_root(args.data), args.split))


if __name__ == "__main__":
    main()
