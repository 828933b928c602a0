"""The one decoding rule from sampler probabilities to masks, keyed on ``cfg.multiclass``.

Binary models (one mask channel) threshold P(object) at the model's ``threshold`` (0.5 unless its
config says otherwise: a threshold chosen on validation, issue 24); multi-class models take the argmax
over their class channels. Probabilities are channel-first with the channel axis third from the
end, so a batch ``(B, C, H, W)`` and a single map ``(C, H, W)`` decode alike.

On disk a probability map is one uint8 plane (:func:`prob_to_u8`): binary models store
``round(255 * P)``, multi-class models store the label itself; :func:`u8_to_mask` turns that plane
into the mask image (255 = object for binary, labels unchanged for multi-class). A binary threshold
``t`` on a stored plane is ``u8 >= u8_cutoff(t)``: exactly ``P >= t`` for 0.5, and within half a
quantum (1/510) of it for other thresholds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

__all__ = ["MaskKind", "MaskChannels", "to_labels", "prob_to_u8", "u8_to_mask", "labels_to_mask",
           "object_pixels", "u8_cutoff", "BINARY_THRESHOLD", "U8_MAX", "STD_TO_UNIT"]

BINARY_THRESHOLD = 0.5
U8_MAX = 255  # a stored probability of 1.0, and the "object" value of a binary mask image
# The vote std of values in [0, 1] is at most 0.5: the stored uncertainty plane is 255 * 2 * std.
STD_TO_UNIT = 2.0
CHANNEL_AXIS = -3


class MaskKind(Protocol):
    """Anything that says whether masks are multi-class and, if binary, where P(object) is cut
    (``ModelConfig`` is one)."""

    @property
    def multiclass(self) -> bool: ...

    @property
    def threshold(self) -> float: ...


@dataclass(frozen=True)
class MaskChannels:
    """A :class:`MaskKind` for callers that know only the mask channel count (``ModelConfig`` rule)."""

    count: int
    threshold: float = BINARY_THRESHOLD

    @property
    def multiclass(self) -> bool:
        return self.count > 1


def to_labels(prob: torch.Tensor, cfg: MaskKind, axis: int = CHANNEL_AXIS) -> torch.Tensor:
    """uint8 labels: binary 0/1 (P >= ``cfg.threshold``), multi-class the argmax class; the channel ``axis`` is dropped.

    ``axis`` is the channel axis: -3 for images and batches, 0 for a (C, X, Y, Z) volume.
    """
    if cfg.multiclass:
        return prob.argmax(dim=axis).to(torch.uint8)
    return (prob.select(axis, 0) >= cfg.threshold).to(torch.uint8)


def prob_to_u8(prob: torch.Tensor, cfg: MaskKind) -> torch.Tensor:
    """The stored uint8 plane: binary round(255 * P), multi-class the argmax label."""
    if cfg.multiclass:
        return prob.argmax(dim=CHANNEL_AXIS).to(torch.uint8)
    return prob.select(CHANNEL_AXIS, 0).clamp(0, 1).mul(U8_MAX).round().to(torch.uint8)


@functools.lru_cache(maxsize=64)  # called per stitched tile and per written tile with the same one or two thresholds
def u8_cutoff(threshold: float) -> int:
    """The stored-plane value a binary threshold becomes: the smallest ``q`` with ``q / 255 >= t`` in
    float32, i.e. the stored probability reaches ``t`` (0.5 -> 128, exactly the rule of
    :func:`to_labels`; within half a quantum of ``P >= t`` otherwise). The nucleus labelling compares
    ``u8 / 255`` with its own threshold the same way, so equal thresholds give equal foregrounds.
    At least 1, so that a zero plane is never object. (round(255 * 0.5) = 128 by rounding half to even,
    so ``>= 128`` on the plane is ``P >= 0.5`` exactly.)"""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"a binary threshold must be strictly between 0 and 1, got {threshold}")
    levels = np.arange(U8_MAX + 1, dtype=np.float32) / np.float32(U8_MAX)
    return max(1, int(np.argmax(levels >= np.float32(threshold))))


def u8_to_mask(plane: np.ndarray, cfg: MaskKind) -> np.ndarray:
    """Mask image from a stored plane: binary 255 where P >= the threshold else 0; multi-class labels as stored."""
    if cfg.multiclass:
        return plane
    return np.where(plane >= u8_cutoff(cfg.threshold), U8_MAX, 0).astype(np.uint8)


def labels_to_mask(labels: np.ndarray, cfg: MaskKind) -> np.ndarray:
    """Mask image from :func:`to_labels` output: binary 0/1 becomes 0/255, class labels stay."""
    return labels if cfg.multiclass else (labels * U8_MAX).astype(np.uint8)


def object_pixels(plane: torch.Tensor, cfg: MaskKind) -> int:
    """Pixels of a stored plane that are object (binary P >= the threshold, multi-class any non-background class)."""
    return int((plane > 0).sum()) if cfg.multiclass else int((plane >= u8_cutoff(cfg.threshold)).sum())
