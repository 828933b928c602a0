"""Scoring protocols of spec section 8, shared by ``cdal-fast eval`` and training validation.

Only the scoring lives here (reading labelled folders, Dice/IoU, means); running the sampler over
tiles and volumes is :mod:`cdal_fast.sampling.inference`, which ``segment`` uses too.

* MoNuSeg: tile -> 512x512 -> four 256 patches -> sampler -> stitched vote mean, rounded;
  Dice/IoU of the nucleus class at 512x512, averaged over images.
* Chest X-ray: whole image at 256x256; Dice/IoU of the lung class.
* Hippocampus: 3D sliding window of 32^3 patches, overlap 0.75, each patch as 32 axial slices;
  per-class Dice/IoU (anterior = 1, posterior = 2) per volume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .datasets import find_pairs, read_split, read_volume_pairs, resolve_2d_root
from .extras import import_extra
from .metrics import dice_iou, per_class_dice_iou
from .network.config import ModelConfig
from .sampling.decode import to_labels
from .sampling.imageio import read_image, read_mask, resize_mask
from .sampling.inference import (
    PatchRunner,
    predict_image,
    predict_monuseg_tile,
    predict_volume,
)
from .sampling.preprocess import match_channels, to_chw_float
from .tasks import get_task

__all__ = ["EvalResult", "evaluate_task", "evaluate_monuseg", "evaluate_cxr", "evaluate_hippocampus", "scalar_dice"]

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


ImageTransform = Callable[[np.ndarray], np.ndarray]  # uint8 RGB -> uint8 RGB, before the protocol (e.g. stains)


def _evaluate_2d(task: str, data: Path, cfg: ModelConfig, runner: PatchRunner, split: str | None,
                 limit: int | None, progress: bool, names: list[str] | None, split_file: str | Path | None,
                 predict: Callable[[torch.Tensor, ModelConfig, PatchRunner], torch.Tensor],
                 image_transform: ImageTransform | None = None) -> EvalResult:
    """A 2D protocol: ``predict`` gives each image's (1, S, S) probability; Dice/IoU at that size, and
    instance scores where the task's tiles carry XML nuclei. ``image_transform`` changes each image's
    pixels first (``eval --stain-normalise``)."""
    root = resolve_2d_root(data)
    pairs = find_pairs(root, names if names is not None else read_split(root, split, split_file))[:limit]
    with_instances = get_task(task).nuclei_annotations
    rows = []
    for name, ip, mp in tqdm(pairs, desc=f"eval {task}", disable=not progress, leave=False):
        pixels = read_image(ip)
        if image_transform is not None:
            pixels = image_transform(np.ascontiguousarray(pixels[..., :3]))
        img = match_channels(to_chw_float(pixels), cfg.img_channels)
        mask = torch.from_numpy(read_mask(mp))
        prob = predict(img, cfg, runner)
        target = resize_mask(mask, prob.shape[-1])
        d, i = dice_iou(to_labels(prob, cfg).bool(), target)
        rows.append({"name": name, "dice": d, "iou": i})
        gt = _instance_truth(root, name) if with_instances else None
        if gt is not None:  # instance metrics where the XML nuclei exist (13 of the 30 MoNuSeg tiles)
            from .nuclei.evaluation import score_tile

            rows[-1].update(score_tile(prob[0], gt, tuple(mask.shape))[0].to_dict())
    return EvalResult(task, _mean(rows, "dice"), _mean(rows, "iou"), rows,
                      runner.sampler.num_steps, runner.sampler.votes)


def evaluate_monuseg(data: Path, cfg: ModelConfig, runner: PatchRunner, split: str | None = None,
                     names: list[str] | None = None, limit: int | None = None, progress: bool = True,
                     split_file: str | Path | None = None, image_transform: ImageTransform | None = None) -> EvalResult:
    """Tiles resized to 512, four 256 patches, the stitched vote mean scored at 512x512."""
    return _evaluate_2d("monuseg", data, cfg, runner, split, limit, progress, names, split_file,
                        lambda img, c, r: predict_monuseg_tile(img, c, r)[None], image_transform)


def evaluate_cxr(data: Path, cfg: ModelConfig, runner: PatchRunner, split: str | None = None,
                 names: list[str] | None = None, limit: int | None = None, progress: bool = True,
                 split_file: str | Path | None = None, image_transform: ImageTransform | None = None) -> EvalResult:
    """Whole radiographs at the model size; the lung class scored at that size."""
    return _evaluate_2d("cxr", data, cfg, runner, split, limit, progress, names, split_file,
                        lambda img, c, r: predict_image(img, c, r)[:1], image_transform)


def volume_affine(data: Path, name: str, cfg: ModelConfig) -> np.ndarray | None:
    """The voxel-to-world affine of image ``name`` when the model needs an orientation, else None."""
    if cfg.volume_orientation == "native":
        return None
    nib = import_extra("nibabel", "the hippocampus evaluation (NIfTI volumes)")
    paths = sorted((data / "imagesTr").glob(f"{name}.nii*"))
    if not paths:
        raise FileNotFoundError(f"image {name!r} not found in {data / 'imagesTr'}")
    return nib.load(str(paths[0])).affine


def evaluate_hippocampus(data: Path, cfg: ModelConfig, runner: PatchRunner, split: str | None = None,
                         names: list[str] | None = None, limit: int | None = None, progress: bool = True,
                         split_file: str | Path | None = None, image_transform: ImageTransform | None = None
                         ) -> EvalResult:
    """The 3D sliding window over each volume; per-class Dice/IoU (anterior, posterior) per volume."""
    if names is None:
        names = read_split(data, split, split_file)
    pairs = read_volume_pairs(data, names)[:limit]
    rows = []
    for name, vol, lab in tqdm(pairs, desc="eval hippocampus", disable=not progress, leave=False):
        pred = predict_volume(vol, cfg, runner, affine=volume_affine(data, name, cfg))
        d, i = per_class_dice_iou(pred, torch.from_numpy(lab.astype(np.int64)), HIPPO_CLASSES)
        rows.append({"name": name, "dice": d, "iou": i})
    return EvalResult("hippocampus", _mean(rows, "dice"), _mean(rows, "iou"), rows,
                      runner.sampler.num_steps, runner.sampler.votes)


def evaluate_task(task: str, data: Path, cfg: ModelConfig, runner: PatchRunner, split: str | None = None,
                  names: list[str] | None = None, limit: int | None = None, progress: bool = True,
                  split_file: str | Path | None = None, image_transform: ImageTransform | None = None) -> EvalResult:
    """Score by ``task``'s protocol (:mod:`cdal_fast.tasks`); ``image_transform`` (RGB tasks) changes
    every image's pixels before the protocol runs."""
    if image_transform is not None and cfg.img_channels != 3:
        raise ValueError(f"{cfg.name} reads {cfg.img_channels}-channel images: an RGB image transform (stain "
                         "normalisation) does not apply")
    score = get_task(task).function("evaluate")
    return score(data, cfg, runner, split, names, limit, progress, split_file, image_transform=image_transform)


def scalar_dice(result: EvalResult) -> float:
    """One number to select checkpoints by (mean over classes for multi-class tasks)."""
    d = result.dice
    return float(np.mean(d)) if isinstance(d, list) else float(d)

