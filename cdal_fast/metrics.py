"""Dice (pixel F1) and IoU (Jaccard) as scored in spec section 8."""

from __future__ import annotations

import torch

__all__ = ["dice_iou", "per_class_dice_iou"]


def dice_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Binary Dice and IoU over all pixels of one image; both empty counts as a perfect 1.0."""
    p, t = pred.bool(), target.bool()
    inter = (p & t).sum().item()
    ps, ts = p.sum().item(), t.sum().item()
    union = ps + ts - inter
    if ps + ts == 0:
        return 1.0, 1.0
    return 2.0 * inter / (ps + ts), inter / union


def per_class_dice_iou(pred: torch.Tensor, target: torch.Tensor, classes: list[int]) -> tuple[list[float], list[float]]:
    """Dice and IoU of each label in ``classes`` (label maps of equal shape)."""
    dice, iou = [], []
    for c in classes:
        d, i = dice_iou(pred == c, target == c)
        dice.append(d)
        iou.append(i)
    return dice, iou
