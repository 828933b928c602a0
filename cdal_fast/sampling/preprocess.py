"""Image normalisation shared by training, evaluation and inference.

Keeping it in one place guarantees the model sees at inference exactly what it saw in training.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..extras import import_extra
from ..network.config import ModelConfig
from .volume import normalise_volume

__all__ = ["normalise", "to_chw_float", "match_channels", "scale_volume", "object_sign", "orient_volume"]

MINMAX_EPS = 1e-8  # a constant volume maps to -1 instead of dividing by zero


def to_chw_float(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """HWC / HW uint8-like array -> (C, H, W) float32 tensor on the 0-255 scale."""
    t = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image, copy=True))
    if t.dim() == 2:
        t = t[:, :, None]
    return t.permute(2, 0, 1).to(torch.float32)


def match_channels(chw: torch.Tensor, channels: int) -> torch.Tensor:
    """Give a (C, H, W) image the model's channel count: RGB -> grey by the channel mean,
    grey -> RGB by repetition. Everything that feeds a model goes through here."""
    if chw.shape[0] == channels:
        return chw
    if channels == 1:
        return chw.mean(0, keepdim=True)
    return chw[:1].expand(channels, -1, -1)


def normalise(image: torch.Tensor | np.ndarray, cfg: ModelConfig) -> torch.Tensor:
    """Per-channel (x - mean) / std on the 0-255 scale.

    Accepts (H, W[, C]) arrays or (C, H, W) / (B, C, H, W) tensors (channels first); returns a
    float32 tensor with a batch dimension.
    """
    if isinstance(image, np.ndarray):
        image = to_chw_float(image)
    t = image.to(torch.float32)
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.shape[1] != cfg.img_channels:
        raise ValueError(f"model expects {cfg.img_channels} image channels, got {t.shape[1]}")
    mean = torch.tensor(cfg.norm_mean, dtype=torch.float32, device=t.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.norm_std, dtype=torch.float32, device=t.device).view(1, -1, 1, 1)
    return (t - mean) / std


def scale_volume(vol: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Intensity scaling of a whole 3D volume before its patches are cut, as the model was trained.

    ``zscore`` (cdal-fast's models): z-score over the non-zero voxels. ``minmax`` (the authors'
    Hippocampus data code, carried by imported models): per-volume min-max to [0, 1], then
    2x - 1. Every volume path (``eval``, ``segment``) calls this one function, so a model never
    sees the other scaling.
    """
    if cfg.volume_scaling == "minmax":
        v = vol.astype(np.float32)
        lo, hi = float(v.min()), float(v.max())
        return (2.0 * (v - lo) / max(hi - lo, MINMAX_EPS) - 1.0).astype(np.float32)
    return normalise_volume(vol)


def object_sign(cfg: ModelConfig) -> float:
    """+1 when the object is the network's +1 side, -1 when it is the -1 side.

    The authors' chest X-ray models were trained with lung = -1 (their scoring flips it back), so
    the sampler turns the final state into an object probability as clamp((sign * x + 1) / 2),
    which is 1 - p for those models; everything after the sampler (vote mean, threshold,
    uncertainty) is then polarity-free.
    """
    return float(cfg.mask_polarity)


def orient_volume(vol: np.ndarray, affine: np.ndarray | None,
                  cfg: ModelConfig) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Reorient a volume to the axis order the model was trained in; returns it and the way back.

    cdal-fast's models see volumes as stored ("native"); the authors' Hippocampus data code
    reoriented every volume to LPI (nibabel axis codes: axis 0 points left, 1 posterior,
    2 inferior) before cutting patches, so their imported model must see that orientation. The
    returned function maps a label map of the reoriented volume back onto the input's grid.
    """
    if cfg.volume_orientation == "native":
        return vol, lambda a: a
    if affine is None:
        raise ValueError(f"model {cfg.name!r} needs volumes reoriented to {cfg.volume_orientation}, "
                         "which needs the volume's affine (none was given)")
    orientations = import_extra("nibabel.orientations", "reorienting volumes")
    source = orientations.io_orientation(affine)
    target = orientations.axcodes2ornt(tuple(cfg.volume_orientation))
    forward, back = orientations.ornt_transform(source, target), orientations.ornt_transform(target, source)
    return np.ascontiguousarray(orientations.apply_orientation(vol, forward)), lambda a: np.ascontiguousarray(
        orientations.apply_orientation(np.asarray(a), back))
