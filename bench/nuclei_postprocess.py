"""Nucleus post-processing cost per tile relative to sampling, and objects per second (issue 21).

One `segment` run of the shipped model on a real H&E image: the pipeline records the sampler's time
(summed over batches) and the nucleus step's time (band labelling, measuring, streaming GeoJSON and
CSV) of the same run, so both numbers come from one run on the same load. Goal: post-processing
under 10 % of the sampling time on CPU.

    python bench/nuclei_postprocess.py                     # one annotated MoNuSeg training tile, CPU
    python bench/nuclei_postprocess.py --crop 512 700      # its top-left 512 x 700 px: 2 tiles
    python bench/nuclei_postprocess.py --image my.ome.tif --mpp 0.25 --device cuda

The machine's load average (1, 5, 15 min) before and after is recorded: on a shared machine other
jobs slow both parts, not necessarily by the same factor.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from cdal_fast.models import load_model
from cdal_fast.runtime.backends import build_sampler
from cdal_fast.sampling.imageio import read_image
from cdal_fast.sampling.inference import DTYPES
from cdal_fast.wsi.options import SegmentOptions
from cdal_fast.wsi.pipeline import segment_slide

try:
    from bench.common import write_results
except ImportError:  # run as a script
    from common import write_results

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "monuseg" / "train" / "images" / "TCGA-21-5784-01Z-00-DX1.tif"
MONUSEG_MPP = 0.25  # 40x; the MoNuSeg TIFFs carry no usable resolution tags
BUSY_LOAD_PER_CPU = 1.0  # 1-min load average per CPU above which the numbers are marked as from a busy machine
GOAL_PCT = 10.0


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--mpp", type=float, default=MONUSEG_MPP, help="um/px of the image's full resolution")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="use only the image's top-left H x W pixels (as a PNG: fewer tiles on a slow machine)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    bundle = load_model(None, device=dev)
    cfg = bundle.config
    sampler = build_sampler(bundle.generator, None, None, "eager", dev, dt)
    opts = SegmentOptions(batch_size=args.batch_size, workers=args.workers, tile_overlap=cfg.image_size // 4,
                          mpp=args.mpp)
    import cdal_fast.nuclei.bands  # noqa: F401  (scikit-image / shapely imports: once per process, not per tile)
    import cdal_fast.nuclei.writers  # noqa: F401

    load_before = _load()
    with tempfile.TemporaryDirectory() as tmp:
        image = args.image
        if args.crop:
            image = Path(tmp) / f"{args.image.stem}_crop.png"
            Image.fromarray(read_image(args.image)[:args.crop[0], :args.crop[1]]).save(image)
        t0 = time.perf_counter()
        summary = segment_slide(image, Path(tmp), sampler, cfg, opts, dev, dt)
        total_s = time.perf_counter() - t0
    load_after = _load()
    tiles, sampler_s = summary["tiles_sampled"], summary["sampler_seconds"]
    post_s, count = summary["nuclei"]["seconds"], summary["nuclei_count"]
    row = {
        "image": args.image.name, "crop": "x".join(map(str, args.crop)) if args.crop else "",
        "tiles": tiles, "device": str(dev), "dtype": args.dtype,
        "sampler_s_per_tile": sampler_s / tiles, "postprocess_s_per_tile": post_s / tiles,
        "postprocess_pct_of_sampling": 100.0 * post_s / sampler_s, "objects": count,
        "objects_per_s": count / post_s if post_s > 0 else 0.0, "total_s": total_s,
        "load_1m_before": load_before[0], "load_1m_after": load_after[0],
    }
    print(row)
    cpus = os.cpu_count() or 1
    busy = max(load_before[0], load_after[0]) > BUSY_LOAD_PER_CPU * cpus
    verdict = ("busy: other jobs ran alongside; rerun on a quiet machine for reference numbers" if busy
               else "no other significant load")
    note = (f"Load average (1/5/15 min) before {load_before}, after {load_after} on "
            f"{cpus} CPUs ({verdict}). Goal: postprocess_pct_of_sampling < {GOAL_PCT:g}. Post-processing = "
            "band labelling + measuring + streamed GeoJSON and CSV (no --save-labels).")
    write_results("nuclei_postprocess", [row], list(row), args.out, note=note,
                  extra={"load_average_before": load_before, "load_average_after": load_after,
                         "cpu_count": os.cpu_count(), "params": summary["nuclei"]["params"]})


if __name__ == "__main__":
    main()
