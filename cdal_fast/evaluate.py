"""Scoring protocols of spec section 8, shared by ``cdal-fast eval`` and training validation.

Only the scoring lives here (reading labelled folders, Dice/IoU, means); running the sampler over
tiles and volumes is :mod:`cdal_fast.inference`, which ``segment`` uses too.

* MoNuSeg: tile -> 512x512 -> four 256 patches -> sampler -> stitched vote mean, rounded;
  Dice/IoU of the nucleus class at 512x512, averaged over images.
* Chest X-ray: whole image at 256x256; Dice/IoU of the lung class.
* Hippocampus: 3D sliding window of 32^3 patches, overlap 0.75, each patch as 32 axial slices;
  per-class Dice/IoU (anterior = 1, posterior = 2) per volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import ModelConfig
from .data.datasets import HippocampusData, find_pairs, read_split, resolve_2d_root
from .decode import to_labels
from .extras import import_extra
from .imageio import read_image, read_mask, resize_mask
from .inference import VOLUME_STRIDE, PatchRunner, predict_image, predict_monuseg_tile, predict_volume, volume_windows
from .metrics import dice_iou, per_class_dice_iou
from .preprocess import match_channels, to_chw_float

# PatchRunner, predict_volume, volume_windows, VOLUME_STRIDE, predict_monuseg_tile: re-exported for
# callers that imported them from here before they moved to cdal_fast.inference.
__all__ = ["EvalResult", "evaluate_task", "scalar_dice", "PatchRunner", "predict_monuseg_tile", "predict_volume",
           "volume_windows", "VOLUME_STRIDE"]

HIPPO_CLASSES = [1, 2]


@dataclass
class EvalResult:
    task: str
    dice: float | list[float]
    iou: float | list[float]
    rows: list[dict] = field(default_factory=list)
    steps: int = 0
    votes: int = 0

    def to_dict(self) -> dict:
        from .nuclei.evaluation import mean_instance_scores  # scikit-image only when scoring

        return {"task": self.task, "dice": self.dice, "iou": self.iou, "steps": self.steps,
                "votes": self.votes, "n": len(self.rows), "instance": mean_instance_scores(self.rows),
                "rows": self.rows}


def _mean(rows: list[dict], key: str) -> float | list[float]:
    vals = [r[key] for r in rows]
    if vals and isinstance(vals[0], list):
        return [float(np.mean([v[i] for v in vals])) for i in range(len(vals[0]))]
    return float(np.mean(vals)) if vals else float("nan")


def _instance_truth(root: Path, name: str) -> Path | None:
    from .nuclei.groundtruth import annotation_path  # stdlib + scikit-image.draw, imported on use

    return annotation_path(root, name)


def evaluate_2d(task: str, data: Path, cfg: ModelConfig, runner: PatchRunner, split: str | None,
                limit: int | None = None, progress: bool = True, names: list[str] | None = None,
                split_file: str | Path | None = None) -> EvalResult:
    root = resolve_2d_root(data)
    pairs = find_pairs(root, names if names is not None else read_split(root, split, split_file))[:limit]
    rows = []
    for name, ip, mp in tqdm(pairs, desc=f"eval {task}", disable=not progress, leave=False):
        img = match_channels(to_chw_float(read_image(ip)), cfg.img_channels)
        mask = torch.from_numpy(read_mask(mp))
        if task == "monuseg":
            prob = predict_monuseg_tile(img, cfg, runner)[None]
        else:
            prob = predict_image(img, cfg, runner)[:1]
        target = resize_mask(mask, prob.shape[-1])
        d, i = dice_iou(to_labels(prob, cfg).bool(), target)
        rows.append({"name": name, "dice": d, "iou": i})
        gt = _instance_truth(root, name) if task == "monuseg" else None
        if gt is not None:  # instance metrics where the XML nuclei exist (13 of the 30 tiles)
            from .nuclei.evaluation import score_tile

            rows[-1].update(score_tile(prob[0], gt, tuple(mask.shape))[0].to_dict())
    return EvalResult(task, _mean(rows, "dice"), _mean(rows, "iou"), rows,
                      runner.sampler.num_steps, runner.sampler.votes)


def volume_affine(data: Path, name: str, cfg: ModelConfig) -> np.ndarray | None:
    """The voxel-to-world affine of image ``name`` when the model needs an orientation, else None."""
    if cfg.volume_orientation == "native":
        return None
    nib = import_extra("nibabel", "the hippocampus evaluation (NIfTI volumes)")
    paths = sorted((data / "imagesTr").glob(f"{name}.nii*"))
    if not paths:
        raise FileNotFoundError(f"image {name!r} not found in {data / 'imagesTr'}")
    return nib.load(str(paths[0])).affine


def evaluate_hippocampus(data: Path, cfg: ModelConfig, runner: PatchRunner, names: list[str] | None = None,
                         limit: int | None = None, progress: bool = True) -> EvalResult:
    pairs = HippocampusData.read_pairs(data, names)[:limit]
    rows = []
    for name, vol, lab in tqdm(pairs, desc="eval hippocampus", disable=not progress, leave=False):
        pred = predict_volume(vol, cfg, runner, affine=volume_affine(data, name, cfg))
        d, i = per_class_dice_iou(pred, torch.from_numpy(lab.astype(np.int64)), HIPPO_CLASSES)
        rows.append({"name": name, "dice": d, "iou": i})
    return EvalResult("hippocampus", _mean(rows, "dice"), _mean(rows, "iou"), rows,
                      runner.sampler.num_steps, runner.sampler.votes)


def evaluate_task(task: str, data: Path, cfg: ModelConfig, runner: PatchRunner, split: str | None = None,
                  names: list[str] | None = None, limit: int | None = None, progress: bool = True,
                  split_file: str | Path | None = None) -> EvalResult:
    if task in ("monuseg", "cxr"):
        return evaluate_2d(task, data, cfg, runner, split, limit, progress, names, split_file)
    if task == "hippocampus":
        if names is None:
            names = read_split(data, split, split_file)
        return evaluate_hippocampus(data, cfg, runner, names, limit, progress)
    raise ValueError(f"unknown task {task!r}")


def scalar_dice(result: EvalResult) -> float:
    """One number to select checkpoints by (mean over classes for multi-class tasks)."""
    d = result.dice
    return float(np.mean(d)) if isinstance(d, list) else float(d)

