"""Teacher targets for distilling a one-pass model: the shipped cDAL ensemble's vote-mean probability
and vote spread on every training tile, computed once and cached (one file per tile, so a stopped run
resumes where it stopped).

    python scripts/distill_targets.py --data ../shared/data/monuseg --out runs/distill/targets

Each tile is resized to 512 x 512 (0.5 um/px, as training and the scoring protocol see it) and the
teacher (the shipped model with its defaults: T 4, V 5, TTA) samples 256-px windows at a stride of
128 px with position-keyed noise. Windows overlap, so an interior pixel pools the votes of up to four
windows (20 votes); the target probability is the pooled vote mean and the target uncertainty the
pooled vote standard deviation (sqrt(E[p^2] - E[p]^2) over all votes covering the pixel, each
window's E[p^2] being its std^2 + mean^2). Only ``--split`` (default ``train``) is used: validation
tiles never make targets.

Written per tile: ``NAME.safetensors`` with ``image`` (3, 512, 512) uint8, ``prob`` and ``std``
(1, 512, 512) float16 and ``mask`` (1, 512, 512) uint8 (the ground truth, for the optional GT term),
and metadata naming the teacher's hash and the settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from cdal_fast.atomic import atomic_output
from cdal_fast.datasets import find_pairs, read_split, resolve_2d_root
from cdal_fast.models import load_model
from cdal_fast.runtime.backends import build_sampler
from cdal_fast.sampling.imageio import read_image, read_mask, resize_image, resize_mask
from cdal_fast.sampling.inference import MONUSEG_WORK_SIZE
from cdal_fast.sampling.preprocess import match_channels, normalise, to_chw_float
from cdal_fast.sampling.sampler import draw_noise, position_generator

WINDOW_STRIDE = 128
TARGETS_FORMAT = "cdal-distill-targets-1"


def window_starts(size: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, size - window + 1, stride))
    return starts if starts[-1] == size - window else [*starts, size - window]


def tile_targets(image: torch.Tensor, sampler, cfg, seed: int, tile_index: int, batch: int,
                 stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled vote mean and std (1, S, S) of the teacher over the windows of one normalised tile.
    ``stride`` None: :data:`WINDOW_STRIDE`, at most half a window (windows always overlap, a smaller
    model's too); a stride of the window size pools nothing: every pixel has its one window's V votes."""
    size, p = image.shape[-1], cfg.image_size
    stride = min(WINDOW_STRIDE, p // 2) if stride is None else min(stride, p)
    corners = [(y, x) for y in window_starts(size, p, stride) for x in window_starts(size, p, stride)]
    s1 = torch.zeros(1, size, size, dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    n = torch.zeros_like(s1)
    for i in range(0, len(corners), batch):
        chunk = corners[i:i + batch]
        windows = torch.stack([image[:, y:y + p, x:x + p] for y, x in chunk])
        gens = [position_generator(seed, tile_index, y, x) for y, x in chunk]
        noise = draw_noise(sampler.num_steps, sampler.votes, cfg.mask_channels, cfg.nz, p, p, gens)
        with torch.inference_mode():
            mean, std = sampler(windows, noise.x_init, noise.z, noise.post)
        for (y, x), m, s in zip(chunk, mean.double(), std.double()):
            s1[:, y:y + p, x:x + p] += m
            s2[:, y:y + p, x:x + p] += s * s + m * m
            n[:, y:y + p, x:x + p] += 1
    mean = s1 / n
    std = torch.sqrt((s2 / n - mean * mean).clamp(min=0.0))
    return mean.float(), std.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="MoNuSeg folder (images/ + masks/, or train/ inside)")
    ap.add_argument("--out", type=Path, required=True, help="folder for NAME.safetensors")
    ap.add_argument("--split", default="train")
    ap.add_argument("--weights", default=None, help="teacher weights (default: the shipped monuseg model)")
    ap.add_argument("--backend", default="auto", help="sampler backend for the teacher (default: auto)")
    ap.add_argument("--batch", type=int, default=1, help="windows per sampler call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window-stride", type=int, default=None,
                    help=f"window stride in px (default {WINDOW_STRIDE}, at most half a window; the model's tile "
                         "size: no pooling, the scoring protocol's patches)")
    args = ap.parse_args()
    bundle = load_model(args.weights)
    cfg = bundle.config
    sampler = build_sampler(bundle.generator, None, None, args.backend, "cpu", torch.float32, bundle.content_sha256,
                            max_batch=args.batch, tta=cfg.tta)
    root = resolve_2d_root(args.data)
    pairs = find_pairs(root, read_split(root, args.split))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"format": TARGETS_FORMAT, "teacher_sha256": bundle.sha256, "teacher": str(bundle.path),
            "steps": str(sampler.num_steps), "votes": str(sampler.votes), "tta": str(cfg.tta),
            "window_stride": str(args.window_stride or WINDOW_STRIDE), "work_size": str(MONUSEG_WORK_SIZE),
            "seed": str(args.seed), "split": args.split}
    t0 = time.perf_counter()
    for i, (name, ip, mp) in enumerate(pairs):
        dest = args.out / f"{name}.safetensors"
        if dest.is_file():
            print(f"[{i + 1}/{len(pairs)}] {name}: done already", flush=True)
            continue
        t = time.perf_counter()
        rgb = resize_image(match_channels(to_chw_float(read_image(ip)), cfg.img_channels), MONUSEG_WORK_SIZE)
        mean, std = tile_targets(normalise(rgb, cfg)[0], sampler, cfg, args.seed, i, args.batch, args.window_stride)
        mask = resize_mask(torch.from_numpy(read_mask(mp)), MONUSEG_WORK_SIZE)
        tensors = {"image": rgb.round().clamp(0, 255).to(torch.uint8), "prob": mean.half(), "std": std.half(),
                   "mask": mask[None].to(torch.uint8)}
        with atomic_output(dest) as tmp:
            save_file(tensors, str(tmp), metadata=meta | {"name": name})
        done = i + 1
        eta = (time.perf_counter() - t0) / done * (len(pairs) - done)
        print(f"[{done}/{len(pairs)}] {name}: {time.perf_counter() - t:.0f} s, mean std {float(std.mean()):.4f}, "
              f"ETA {eta / 60:.1f} min", flush=True)
    (args.out / "targets.json").write_text(json.dumps(meta | {"tiles": [n for n, _, _ in pairs]}, indent=2) + "\n")
    print(f"targets for {len(pairs)} tiles in {args.out} ({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
