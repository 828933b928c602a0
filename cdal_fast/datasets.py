"""Labelled dataset folders of the three published tasks, laid out like ``shared/data``.

* 2D tasks (MoNuSeg, chest X-ray): ``images/NAME.tif|png`` + ``masks/NAME.png`` (or a folder with
  ``train/images`` inside, as the shared MoNuSeg copy).
* Hippocampus: ``imagesTr/NAME.nii.gz`` + ``labelsTr/NAME.nii.gz``.
* Splits: ``split.json`` (``{"train": [...], "val": [...]}``) beside the data, or a named file.

Read by scoring (:mod:`cdal_fast.evaluate`) and training (:mod:`cdal_fast.training.data`) alike, so
neither imports the other to find its files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .extras import import_extra
from .sampling.imageio import IMAGE_SUFFIXES

__all__ = ["find_pairs", "read_split", "resolve_2d_root", "read_volume_pairs", "make_split"]


def find_pairs(root: Path, names: list[str] | None = None) -> list[tuple[str, Path, Path]]:
    """(name, image, mask) triples of ``root/images`` and ``root/masks`` with matching stems."""
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise FileNotFoundError(f"{root} must contain images/ and masks/ folders")
    images = {p.stem: p for p in sorted(img_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    wanted = names if names is not None else sorted(images)
    out = []
    for n in wanted:
        if n not in images:
            raise FileNotFoundError(f"image {n!r} not found in {img_dir}")
        if n not in masks:
            raise FileNotFoundError(f"mask for {n!r} not found in {mask_dir}")
        out.append((n, images[n], masks[n]))
    if not out:
        raise FileNotFoundError(f"no image/mask pairs in {root}")
    return out


def read_split(root: Path, split: str | None, split_file: str | Path | None = None) -> list[str] | None:
    """Names of ``split`` from ``split_file``, else a ``split.json`` in ``root`` or its parent.

    None or "all" selects everything.
    """
    if split is None or split == "all":
        return None
    cands = [Path(split_file)] if split_file else [root / "split.json", root.parent / "split.json"]
    for cand in cands:
        if cand.is_file():
            data = json.loads(cand.read_text())
            if split not in data:
                raise KeyError(f"{cand} has no split {split!r} (has: {', '.join(data)})")
            return list(data[split])
    raise FileNotFoundError(f"no split.json in {root} or {root.parent} for split {split!r}; name the split "
                            "file (the repository's seeded splits are train/splits/<task>.json)")


def resolve_2d_root(data: Path) -> Path:
    """Accept either a folder with images/ + masks/ or the shared MoNuSeg folder (train/ inside)."""
    if (data / "images").is_dir():
        return data
    if (data / "train" / "images").is_dir():
        return data / "train"
    raise FileNotFoundError(f"{data} has no images/ folder (expected images/ and masks/)")


def read_volume_pairs(data: Path, names: list[str] | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, volume, labels) of ``data/imagesTr`` and ``data/labelsTr`` (optionally only ``names``)."""
    nib = import_extra("nibabel", "the hippocampus data (NIfTI volumes)")
    img_dir, lab_dir = data / "imagesTr", data / "labelsTr"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise FileNotFoundError(f"{data} must contain imagesTr/ and labelsTr/ folders")
    files = sorted(p for p in img_dir.glob("*.nii*") if not p.name.startswith("._"))
    out = []
    for p in files:
        name = p.name.split(".nii")[0]
        if names is not None and name not in names:
            continue
        lp = lab_dir / p.name
        if not lp.is_file():
            raise FileNotFoundError(f"label for {name!r} not found in {lab_dir}")
        out.append((name, np.asarray(nib.load(p).dataobj), np.asarray(nib.load(lp).dataobj)))
    return out



def make_split(names: list[str], seed: int = 0, val_fraction: float = 0.2) -> dict[str, list[str]]:
    """A seeded train/val split of ``names`` (sorted first, so the result is order-independent)."""
    ordered = sorted(names)
    perm = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(ordered) * val_fraction))
    val = sorted(ordered[i] for i in perm[:n_val])
    return {"train": sorted(set(ordered) - set(val)), "val": val, "seed": seed}
