"""Instance scoring of one MoNuSeg tile: the protocol's probability map against the XML nuclei.

The section-8 protocol samples a tile at 512x512; the ground-truth instances live on the tile's own
1000x1000 grid. The probability is resized (bilinear) to that grid and labelled there with the
tile's pixel size (the XML's ``MicronsPerPixel``), so objects are compared on the annotators'
grid and the um-based parameters mean the same as on slides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import InstanceScores, instance_scores
from .groundtruth import read_annotation
from .params import DEFAULT_PARAMS, NucleiParams
from .separate import label_nuclei

__all__ = ["INSTANCE_KEYS", "MONUSEG_MPP", "mean_instance_scores", "resize_prob", "score_tile"]

MONUSEG_MPP = 0.25  # 40x scans; used when an XML does not state MicronsPerPixel
INSTANCE_KEYS = ("aji", "pq", "dq", "sq", "f1")


def resize_prob(prob: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2D probability map to ``shape`` (float32 numpy)."""
    t = torch.as_tensor(np.asarray(prob, np.float32))
    if tuple(t.shape) != tuple(shape):
        t = F.interpolate(t[None, None], size=shape, mode="bilinear", align_corners=False)[0, 0]
    return t.numpy()


def score_tile(prob: np.ndarray | torch.Tensor, annotation: Path, shape: tuple[int, int],
               params: NucleiParams = DEFAULT_PARAMS) -> tuple[InstanceScores, np.ndarray]:
    """Scores and predicted labels of one tile whose instances are in ``annotation`` (tile ``shape``)."""
    truth, mpp = read_annotation(annotation, shape)
    mpp = mpp or MONUSEG_MPP
    pred = label_nuclei(resize_prob(prob, shape), params, mpp)
    return instance_scores(truth, pred), pred


def mean_instance_scores(rows: list[dict]) -> dict[str, float] | None:
    """Means of the instance scores over the rows that have them (None when no row has)."""
    scored = [r for r in rows if "aji" in r]
    if not scored:
        return None
    return {k: float(np.mean([r[k] for r in scored])) for k in INSTANCE_KEYS} | {"n": len(scored)}
