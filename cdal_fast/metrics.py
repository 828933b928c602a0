"""Dice (pixel F1) and IoU (Jaccard) as scored in spec section 8, and instance metrics (AJI, PQ)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["InstanceScores", "aggregated_jaccard", "dice_iou", "instance_scores", "per_class_dice_iou"]


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


# ---------------------------------------------------------------------------------------------
# Instance metrics (nuclei as objects). Inputs are integer label maps of equal shape, 0 = background;
# labels need not be consecutive.

PQ_MATCH_IOU = 0.5  # above this IoU two objects can match only each other (Kirillov et al. 2019)


@dataclass(frozen=True)
class InstanceScores:
    """AJI and the panoptic-quality family of one image (F1 at IoU 0.5 is DQ by definition)."""

    aji: float
    pq: float
    dq: float
    sq: float
    f1: float
    tp: int
    fp: int
    fn: int
    n_true: int
    n_pred: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _overlaps(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Object ids, areas and the (n_true, n_pred) intersection table of two label maps."""
    if true.shape != pred.shape:
        raise ValueError(f"instance metrics: true {true.shape} and pred {pred.shape} label maps differ in shape")
    t_ids, t_inv = np.unique(true.ravel(), return_inverse=True)
    p_ids, p_inv = np.unique(pred.ravel(), return_inverse=True)
    table = np.bincount(t_inv * p_ids.size + p_inv, minlength=t_ids.size * p_ids.size).reshape(t_ids.size, p_ids.size)
    # drop the background row/column (id 0 sorts first when present)
    t_fg = t_ids != 0
    p_fg = p_ids != 0
    inter = table[np.ix_(t_fg, p_fg)].astype(np.int64)
    t_area = np.bincount(t_inv, minlength=t_ids.size)[t_fg].astype(np.int64)
    p_area = np.bincount(p_inv, minlength=p_ids.size)[p_fg].astype(np.int64)
    return t_ids[t_fg], p_ids[p_fg], t_area, p_area, inter


def aggregated_jaccard(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI (Kumar et al. 2017): each true object with its best-IoU prediction; every prediction
    never chosen adds its whole area to the union, a true object without overlap adds its own.

    A prediction may be the best match of several true objects (counted each time, as defined).
    No objects at all on either side scores 1.0.
    """
    _, _, t_area, p_area, inter = _overlaps(true, pred)
    if t_area.size == 0 and p_area.size == 0:
        return 1.0
    union = t_area[:, None] + p_area[None, :] - inter
    inter_sum = 0
    union_sum = 0
    used = np.zeros(p_area.size, bool)
    if p_area.size:
        iou = inter / np.maximum(union, 1)
        best = iou.argmax(axis=1)
        hit = iou[np.arange(t_area.size), best] > 0
        inter_sum += int(inter[hit, best[hit]].sum())
        union_sum += int(union[hit, best[hit]].sum())
        used[best[hit]] = True
        union_sum += int(t_area[~hit].sum())
    else:
        union_sum += int(t_area.sum())
    union_sum += int(p_area[~used].sum())
    return inter_sum / union_sum


def instance_scores(true: np.ndarray, pred: np.ndarray) -> InstanceScores:
    """AJI, PQ = DQ x SQ with unique matches at IoU > 0.5, and object F1 at IoU 0.5 (= DQ).

    DQ = TP / (TP + FP/2 + FN/2); SQ = mean IoU of the matches (0 without matches). With no
    objects on either side every score is 1.0.
    """
    _, _, t_area, p_area, inter = _overlaps(true, pred)
    n_t, n_p = t_area.size, p_area.size
    aji = aggregated_jaccard(true, pred)
    if n_t == 0 and n_p == 0:
        return InstanceScores(aji, 1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0, 0)
    iou = inter / np.maximum(t_area[:, None] + p_area[None, :] - inter, 1)
    matched = iou > PQ_MATCH_IOU  # at most one per row and column: IoU > 0.5 is exclusive
    tp = int(matched.sum())
    fp, fn = n_p - tp, n_t - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(iou[matched].mean()) if tp else 0.0
    return InstanceScores(aji, dq * sq, dq, sq, dq, tp, fp, fn, n_t, n_p)
