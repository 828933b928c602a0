"""Run the shipped MoNuSeg model once on the annotated training tiles and cache its maps.

The grid search of nucleus post-processing (``scripts/tune_nuclei.py``) needs the vote-mean
probability and the vote spread of every annotated training tile; sampling them takes about half a
minute per tile on a 2-core CPU, so they are computed once here (section-8 geometry: tile -> 512 ->
four 256 patches with position-keyed noise, exactly what ``cdal-fast eval`` scores) and stored as
``OUT/NAME.npz`` (``prob`` and ``std``, float16, 512x512). Validation tiles are never touched.

    PYTHONPATH=$PWD python scripts/cache_nuclei_maps.py --data ../shared/data/monuseg --out out/nuclei_maps
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from cdal_fast.atomic import atomic_output
from cdal_fast.datasets import read_split
from cdal_fast.models import load_model
from cdal_fast.nuclei.groundtruth import annotated_names
from cdal_fast.sampling.imageio import read_image, resize_image
from cdal_fast.sampling.preprocess import match_channels, normalise, to_chw_float
from cdal_fast.sampling.sampler import FixedStepSampler, position_generator, sample

WORK_SIZE = 512  # the section-8 working size of a MoNuSeg tile


@torch.no_grad()
def tile_maps(image_chw: torch.Tensor, sampler: FixedStepSampler, cfg, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Vote mean and vote std (WORK_SIZE^2) of one tile, patch noise keyed as in ``evaluate``."""
    p = cfg.image_size
    img = resize_image(image_chw, WORK_SIZE)
    keys = [(r * p, c * p) for r in range(WORK_SIZE // p) for c in range(WORK_SIZE // p)]
    patches = normalise(torch.stack([img[:, y:y + p, x:x + p] for y, x in keys]), cfg)
    prob, std = sample(sampler, patches, generators=[position_generator(seed, *k) for k in keys])
    mean_map = np.zeros((WORK_SIZE, WORK_SIZE), np.float32)
    std_map = np.zeros_like(mean_map)
    for (y, x), pr, sd in zip(keys, prob, std):
        mean_map[y:y + p, x:x + p] = pr[0].numpy()
        std_map[y:y + p, x:x + p] = sd[0].numpy()
    return mean_map, std_map


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    bundle = load_model(task="monuseg")
    sampler = FixedStepSampler(bundle.generator).eval()
    names = [n for n in read_split(args.data, "train") if n in annotated_names(args.data)]
    for name in names:
        dest = args.out / f"{name}.npz"
        if dest.exists():
            continue
        t0 = time.perf_counter()
        img = match_channels(to_chw_float(read_image(args.data / "train" / "images" / f"{name}.tif")),
                             bundle.config.img_channels)
        prob, std = tile_maps(img, sampler, bundle.config)
        with atomic_output(dest) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, prob=prob.astype(np.float16), std=std.astype(np.float16))
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
