"""Training data of the three published tasks as tensors on the training device.

* MoNuSeg: tiles resized to 512 (about 0.5 um/px); random 256 crops with the section-7
  augmentations (and optional H&E stain jitter).
* Chest X-ray: whole images at 256 with mild rotation/scale jitter.
* Hippocampus: random 32^3 patches cut into 32 axial 32x32 slices with three-class one-hot masks in
  [-1, 1].

Batches are drawn with a ``torch.Generator``: no worker processes, and a checkpoint that stores the
generator state resumes the exact same batch sequence. Which folder holds what is
:mod:`cdal_fast.datasets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets import find_pairs, read_split, read_volume_pairs, resolve_2d_root
from ..network.config import ModelConfig
from ..sampling.imageio import read_image, read_mask, resize_image, resize_mask
from ..sampling.preprocess import match_channels, normalise, to_chw_float
from ..sampling.volume import normalise_volume, pad_to, window_starts
from ..tasks import get_task
from .augment import color_jitter, hed_jitter, random_affine_crop

__all__ = ["TaskData", "MonusegData", "CxrData", "HippocampusData", "load_task_data"]


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

    @staticmethod
    def from_split(data: Path, cfg: ModelConfig, split: str | None, split_file: str | Path | None) -> TaskData:
        return MonusegData.load(data, cfg, split, split_file=split_file)


class CxrData:
    """Chest radiographs and lung masks at the model size, with mild rotation/scale jitter."""

    @staticmethod
    def load(data: Path, cfg: ModelConfig, names: list[str] | None = None) -> TaskData:
        root = resolve_2d_root(data)
        imgs, masks, names = _load_2d(root, names, cfg.image_size, cfg.img_channels)
        return TaskData(cfg, imgs, masks, names, "cxr")

    @staticmethod
    def from_split(data: Path, cfg: ModelConfig, split: str | None, split_file: str | Path | None) -> TaskData:
        return CxrData.load(data, cfg, read_split(resolve_2d_root(data), split, split_file))


class HippocampusData:
    """Volumes -> every 32^3 patch position's axial slices, drawn at random for training."""

    @staticmethod
    def load(data: Path, cfg: ModelConfig, names: list[str] | None = None) -> TaskData:
        """All axial 32x32 slices of 32^3 patches at stride 8 (the eval window), as training data."""
        size = cfg.image_size
        imgs, masks = [], []
        for _, vol, lab in read_volume_pairs(data, names):
            v = torch.from_numpy(normalise_volume(vol))
            lab_t = torch.from_numpy(lab.astype(np.int64))
            v, lab_t = pad_to(v, size), pad_to(lab_t, size)
            for x0, y0, z0 in window_starts(v.shape, size, 8):
                pv = v[x0:x0 + size, y0:y0 + size, z0:z0 + size].permute(2, 0, 1)  # (z, x, y)
                pl = lab_t[x0:x0 + size, y0:y0 + size, z0:z0 + size].permute(2, 0, 1)
                imgs.append(pv[:, None])
                masks.append(F.one_hot(pl, cfg.mask_channels).permute(0, 3, 1, 2).float() * 2 - 1)
        return TaskData(cfg, torch.cat(imgs), torch.cat(masks), [], "none")

    @staticmethod
    def from_split(data: Path, cfg: ModelConfig, split: str | None, split_file: str | Path | None) -> TaskData:
        return HippocampusData.load(data, cfg, read_split(data, split, split_file))


def load_task_data(task: str, data: Path, cfg: ModelConfig, split: str | None = "train",
                   split_file: str | Path | None = None) -> TaskData:
    """``task``'s training tensors (its loader is named in :mod:`cdal_fast.tasks`)."""
    return get_task(task).function("training_data")(data, cfg, split, split_file)
