"""Estimate the stain-normalisation reference of a nuclei model once, from its training tiles.

The reference is the Macenko estimate (two H&E stain vectors and their 99th-percentile
concentrations, :func:`cdal_fast.nuclei.stain.estimate_macenko`) of the pooled pixels of the
*training* split's tiles only (validation tiles are kept for measuring). It is stored beside the
weights as ``NAME.stain.json``; ``cdal-fast segment --stain-normalise`` and
``cdal-fast eval --stain-normalise`` map every input's stains onto it.

    python scripts/stain_reference.py                                  # shipped MoNuSeg model
    python scripts/stain_reference.py --data DIR --out path/to/NAME.stain.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cdal_fast.atomic import atomic_output
from cdal_fast.datasets import find_pairs, read_split, resolve_2d_root
from cdal_fast.nuclei.stain import estimate_macenko
from cdal_fast.sampling.imageio import read_image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "monuseg"
DEFAULT_OUT = REPO / "cdal_fast" / "models" / "monuseg.stain.json"
PIXELS_PER_TILE = 250_000  # a regular subsample of each tile: every tile weighs the same


def pooled_pixels(paths: list[Path], per_tile: int = PIXELS_PER_TILE) -> np.ndarray:
    """A regular (deterministic) subsample of every tile's RGB pixels, concatenated."""
    chunks = []
    for p in paths:
        rgb = read_image(p)[..., :3].reshape(-1, 3)
        step = max(1, rgb.shape[0] // per_tile)
        chunks.append(rgb[::step])
    return np.concatenate(chunks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--split", default="train")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    root = resolve_2d_root(args.data)
    names = read_split(root, args.split)
    pairs = find_pairs(root, names)
    pixels = pooled_pixels([ip for _, ip, _ in pairs])
    profile = estimate_macenko(pixels, "h-e")
    record = {
        "format": "cdal-fast-stain-reference", "format_version": 1, "method": "macenko",
        "profile": profile.to_dict(),
        "estimated_from": {"data": args.data.name, "split": args.split, "tiles": [n for n, _, _ in pairs],
                           "pixels": int(pixels.shape[0]), "pixels_per_tile": PIXELS_PER_TILE},
        "script": "scripts/stain_reference.py",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["profile"]))


if __name__ == "__main__":
    main()
