"""Image normalisation shared by training, evaluation and inference.

Keeping it in one place guarantees the model sees at inference exactly what it saw in training.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import ModelConfig

__all__ = ["normalise", "to_chw_float", "match_channels"]


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
