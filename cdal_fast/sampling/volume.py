"""Volume helpers shared by hippocampus training and inference: intensity normalisation and windows.

They live outside ``data/`` so the sliding-window inference (:mod:`cdal_fast.sampling.inference`) does not
import the training datasets.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["normalise_volume", "pad_to", "window_starts"]


def normalise_volume(vol: np.ndarray) -> np.ndarray:
    """Z-score a volume over its non-zero voxels (MR intensities have no fixed scale)."""
    v = vol.astype(np.float32)
    fg = v[v != 0]
    if fg.size < 2:
        return v
    return (v - fg.mean()) / max(float(fg.std()), 1e-6)


def pad_to(vol: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad each spatial axis of a 3D tensor up to ``size`` (at the end)."""
    pads = []
    for dim in reversed(vol.shape):
        pads += [0, max(0, size - dim)]
    return F.pad(vol, pads) if any(pads) else vol


def window_starts(shape: tuple[int, ...], size: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding-window corners covering a 3D volume, the last window flush with the end."""
    axes = []
    for dim in shape:
        starts = list(range(0, max(dim - size, 0) + 1, stride))
        if starts[-1] != max(dim - size, 0):
            starts.append(max(dim - size, 0))
        axes.append(starts)
    return [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]
