"""Write a compact copy of MoNuSeg for GPU runs: tiles resized to 512x512 PNG (+ masks, split.json).

    python scripts/make_compact_monuseg.py ../shared/data/monuseg .gpu/monuseg512

The resize is the one training and evaluation use (anti-aliased bilinear for images, area +
threshold for masks), so results on the copy equal results on the original up to uint8 rounding.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cdal_fast.datasets import find_pairs, resolve_2d_root
from cdal_fast.sampling.imageio import read_image, read_mask, resize_image, resize_mask
from cdal_fast.sampling.preprocess import to_chw_float


def main(src: Path, dst: Path, size: int = 512) -> None:
    root = resolve_2d_root(src)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    for name, ip, mp in find_pairs(root):
        img = resize_image(to_chw_float(read_image(ip)), size)
        arr = img.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(dst / "images" / f"{name}.png")
        m = resize_mask(torch.from_numpy(read_mask(mp)), size).numpy().astype(np.uint8) * 255
        Image.fromarray(m).save(dst / "masks" / f"{name}.png")
    for cand in (src / "split.json", root / "split.json"):
        if cand.is_file():
            shutil.copy(cand, dst / "split.json")
            break
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
