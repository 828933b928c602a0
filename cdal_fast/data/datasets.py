"""Datasets of the three published tasks, read from folders laid out like ``shared/data``.

* MoNuSeg: ``images/NAME.tif|png`` + ``masks/NAME.png``; tiles are resized to 512 (about 0.5 um/px)
  and random 256 crops are taken with the section-7 augmentations.
* Chest X-ray: ``images/NAME.png`` + ``masks/NAME.png`` (grey); whole images at 256.
* Hippocampus: ``imagesTr/NAME.nii.gz`` + ``labelsTr/NAME.nii.gz``; random 32^3 patches cut into
  32 axial 32x32 slices with three-class one-hot masks in [-1, 1].

Training data are held as tensors on the training device and batches are drawn with a
``torch.Generator``: no worker processes, and a checkpoint that stores the generator state
resumes the exact same batch sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..extras import import_extra
from ..imageio import IMAGE_SUFFIXES, read_image, read_mask, resize_image, resize_mask
from ..preprocess import match_channels, normalise, to_chw_float
from ..volume import normalise_volume, pad_to, window_starts
from .augment import color_jitter, hed_jitter, random_affine_crop

__all__ = ["TaskData", "MonusegData", "CxrData", "HippocampusData", "load_task_data", "find_pairs",
           "read_split", "normalise_volume"]

TASKS = ("monuseg", "cxr", "hippocampus")


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


@dataclass
class TaskData:
    """Training tensors of one task on one device."""

    cfg: ModelConfig
    images: torch.Tensor  # (N, C, H, W) float32 on the 0-255 scale
    masks: torch.Tensor  # (N, Cm, H, W) float32 in {-1, 1}
    names: list[str]
    augment: str  # "monuseg" | "cxr" | "none"
    hed_sigma: float = 0.0  # H&E stain jitter strength for "monuseg" (0: off)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> TaskData:
        return TaskData(self.cfg, self.images.to(device), self.masks.to(device), self.names, self.augment,
                        self.hed_sigma)

    def batch(self, batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random augmented batch: (normalised image, mask in [-1, 1]) at the model size."""
        idx = torch.randint(0, len(self), (batch_size,), generator=g, device=g.device).to(self.images.device)
        img, msk = self.images[idx], self.masks[idx]
        size = self.cfg.image_size
        if self.augment == "monuseg":
            img, msk = random_affine_crop(img, msk, size, g)
            img = color_jitter(hed_jitter(img / 255.0, g, self.hed_sigma), g) * 255.0
        elif self.augment == "cxr":
            img, msk = random_affine_crop(img, msk, size, g, max_rot_deg=10.0, scale=(0.9, 1.1), flips=False)
        elif img.shape[-1] != size:
            raise ValueError(f"training images are {img.shape[-1]} px, model expects {size}")
        return normalise(img, self.cfg), msk


def _load_2d(root: Path, names: list[str] | None, size: int,
             channels: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    imgs, masks, out_names = [], [], []
    for name, ip, mp in find_pairs(root, names):
        img = match_channels(to_chw_float(read_image(ip)), channels)
        imgs.append(resize_image(img, size))
        masks.append(resize_mask(torch.from_numpy(read_mask(mp)), size).float()[None] * 2 - 1)
        out_names.append(name)
    return torch.stack(imgs), torch.stack(masks), out_names


class MonusegData:
    """MoNuSeg tiles resized to ``tile_size`` (512 = the model's 0.5 um/px)."""

    @staticmethod
    def load(data: Path, cfg: ModelConfig, split: str | None = "train", tile_size: int = 512,
             split_file: str | Path | None = None) -> TaskData:
        root = resolve_2d_root(data)
        names = read_split(root, split, split_file)
        imgs, masks, names = _load_2d(root, names, tile_size, cfg.img_channels)
        return TaskData(cfg, imgs, masks, names, "monuseg")


class CxrData:
    """Chest radiographs and lung masks at the model size, with mild rotation/scale jitter."""

    @staticmethod
    def load(data: Path, cfg: ModelConfig, names: list[str] | None = None) -> TaskData:
        root = resolve_2d_root(data)
        imgs, masks, names = _load_2d(root, names, cfg.image_size, cfg.img_channels)
        return TaskData(cfg, imgs, masks, names, "cxr")


class HippocampusData:
    """Volumes -> every 32^3 patch position's axial slices, drawn at random for training."""

    @staticmethod
    def read_pairs(data: Path, names: list[str] | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
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

    @staticmethod
    def load(data: Path, cfg: ModelConfig, names: list[str] | None = None) -> TaskData:
        """All axial 32x32 slices of 32^3 patches at stride 8 (the eval window), as training data."""
        size = cfg.image_size
        imgs, masks = [], []
        for _, vol, lab in HippocampusData.read_pairs(data, names):
            v = torch.from_numpy(normalise_volume(vol))
            lab_t = torch.from_numpy(lab.astype(np.int64))
            v, lab_t = pad_to(v, size), pad_to(lab_t, size)
            for x0, y0, z0 in window_starts(v.shape, size, 8):
                pv = v[x0:x0 + size, y0:y0 + size, z0:z0 + size].permute(2, 0, 1)  # (z, x, y)
                pl = lab_t[x0:x0 + size, y0:y0 + size, z0:z0 + size].permute(2, 0, 1)
                imgs.append(pv[:, None])
                masks.append(F.one_hot(pl, cfg.mask_channels).permute(0, 3, 1, 2).float() * 2 - 1)
        return TaskData(cfg, torch.cat(imgs), torch.cat(masks), [], "none")


def load_task_data(task: str, data: Path, cfg: ModelConfig, split: str | None = "train",
                   split_file: str | Path | None = None) -> TaskData:
    if task == "monuseg":
        return MonusegData.load(data, cfg, split, split_file=split_file)
    if task == "cxr":
        return CxrData.load(data, cfg, read_split(resolve_2d_root(data), split, split_file))
    if task == "hippocampus":
        return HippocampusData.load(data, cfg, read_split(data, split, split_file))
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def make_split(names: list[str], seed: int = 0, val_fraction: float = 0.2) -> dict[str, list[str]]:
    """A seeded train/val split of ``names`` (sorted first, so the result is order-independent)."""
    ordered = sorted(names)
    perm = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(ordered) * val_fraction))
    val = sorted(ordered[i] for i in perm[:n_val])
    return {"train": sorted(set(ordered) - set(val)), "val": val, "seed": seed}
