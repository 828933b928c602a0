"""End-to-end `segment` throughput against sampler-only throughput on the same machine.

The difference is the cost of reading, tissue detection, stitching and writing (target: < 10%).

    python bench/segment_overhead.py                        # shipped model, bundled sample
    python bench/segment_overhead.py --slide my.ome.tif --device cuda --dtype bfloat16 --batch-size 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cdal_fast.models import load_model
from cdal_fast.runtime.backends import build_sampler
from cdal_fast.sampling.inference import DTYPES
from cdal_fast.sampling.sampler import draw_noise, generators_from_seed
from cdal_fast.wsi.options import SegmentOptions
from cdal_fast.wsi.pipeline import segment_slide

try:
    from bench.common import write_results
except ImportError:  # run as a script
    from common import write_results

SAMPLE = Path(__file__).resolve().parents[1] / "cdal_fast" / "samples" / "sample_ihc.ome.tif"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=SAMPLE)
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    bundle = load_model(args.weights, device=dev)
    sampler = build_sampler(bundle.generator, None, None, args.backend, dev, dt)
    cfg = bundle.config
    opts = SegmentOptions(batch_size=args.batch_size, workers=args.workers, tile_overlap=cfg.image_size // 4)

    with tempfile.TemporaryDirectory() as tmp:
        segment_slide(args.slide, Path(tmp), sampler, cfg, opts, dev, dt)  # warm-up (and cuDNN autotune)
        t0 = time.perf_counter()
        summary = segment_slide(args.slide, Path(tmp) / "timed", sampler, cfg, opts, dev, dt)
        e2e_s = time.perf_counter() - t0
    tiles = summary["tiles_sampled"]

    p = cfg.image_size
    batches = [args.batch_size] * (tiles // args.batch_size)
    if tiles % args.batch_size:
        batches.append(tiles % args.batch_size)
    images = [torch.randn(b, cfg.img_channels, p, p) for b in batches]
    noises = [draw_noise(sampler.num_steps, sampler.votes, cfg.mask_channels, cfg.nz, p, p,
                         generators_from_seed(i, b)) for i, b in enumerate(batches)]
    with torch.inference_mode():
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for img, n in zip(images, noises):
            n = n.to(dev, dt)
            prob, _ = sampler(img.to(dev, dt), n.x_init, n.z, n.post)
            prob.float().cpu()
        sampler_s = time.perf_counter() - t0
    row = {
        "slide": args.slide.name, "tiles": tiles, "device": str(dev), "dtype": args.dtype, "backend": args.backend,
        "batch": args.batch_size, "workers": args.workers,
        "e2e_tiles_per_s": tiles / e2e_s, "sampler_tiles_per_s": tiles / sampler_s,
        "overhead_pct": 100.0 * (1.0 - sampler_s / e2e_s),
    }
    print(row)
    write_results("segment_overhead", [row], list(row), args.out)


if __name__ == "__main__":
    main()
