"""Scoring protocols of spec section 8, shared by ``cdal-fast eval`` and training validation.

* MoNuSeg: tile -> 512x512 -> four 256 patches -> sampler -> stitched vote mean, rounded;
  Dice/IoU of the nucleus class at 512x512, averaged over images.
* Chest X-ray: whole image at 256x256; Dice/IoU of the lung class.
* Hippocampus: 3D sliding window of 32^3 patches, overlap 0.75, each patch as 32 axial slices;
  per-class Dice/IoU (anterior = 1, posterior = 2) per volume.

Noise is keyed by the patch position (:func:`cdal_fast.sampler.position_generator`), so a patch
gets the same noise whatever batch it runs in, and ``segment`` on the same geometry reproduces
these numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import ModelConfig
from .data.datasets import (
    HippocampusData,
    find_pairs,
    normalise_volume,
    pad_to,
    read_split,
    resolve_2d_root,
    window_starts,
)
from .data.imageio import read_image, read_mask, resize_image, resize_mask
from .metrics import dice_iou, per_class_dice_iou
from .preprocess import match_channels, normalise, to_chw_float
from .sampler import FixedStepSampler, position_generator, sample

__all__ = ["EvalResult", "evaluate_task", "PatchRunner"]

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


class PatchRunner:
    """Run a sampler over normalised patches in batches with position-keyed noise."""

    def __init__(self, sampler: FixedStepSampler, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 4, seed: int = 0) -> None:
        self.sampler = sampler
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.seed = seed

    @torch.no_grad()
    def __call__(self, patches: torch.Tensor, keys: list[tuple[int, ...]]) -> torch.Tensor:
        """patches (N, C, H, W) normalised; returns vote-mean probabilities (N, Cm, H, W) on CPU."""
        out = []
        for i in range(0, patches.shape[0], self.batch_size):
            chunk = patches[i:i + self.batch_size].to(self.device, self.dtype)
            gens = [position_generator(self.seed, *k) for k in keys[i:i + self.batch_size]]
            prob, _ = sample(self.sampler, chunk, generators=gens)
            out.append(prob.float().cpu())
        return torch.cat(out)


def _mean(rows: list[dict], key: str) -> float | list[float]:
    vals = [r[key] for r in rows]
    if vals and isinstance(vals[0], list):
        return [float(np.mean([v[i] for v in vals])) for i in range(len(vals[0]))]
    return float(np.mean(vals)) if vals else float("nan")


def predict_monuseg_tile(image_chw: torch.Tensor, cfg: ModelConfig, runner: PatchRunner,
                         work_size: int = 512) -> torch.Tensor:
    """Probability map (work_size, work_size) of one tile by the section-8 protocol."""
    p = cfg.image_size
    img = resize_image(image_chw, work_size)
    n = work_size // p
    patches, keys = [], []
    for r in range(n):
        for c in range(n):
            patches.append(img[:, r * p:(r + 1) * p, c * p:(c + 1) * p])
            keys.append((r * p, c * p))
    prob = runner(normalise(torch.stack(patches), cfg), keys)
    full = torch.zeros(work_size, work_size)
    for (y, x), pr in zip(keys, prob):
        full[y:y + p, x:x + p] = pr[0]
    return full


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
            prob = predict_monuseg_tile(img, cfg, runner)
        else:
            prob = runner(normalise(resize_image(img, cfg.image_size)[None], cfg), [(0, 0)])[0, 0]
        target = resize_mask(mask, prob.shape[-1])
        d, i = dice_iou(prob >= 0.5, target)
        rows.append({"name": name, "dice": d, "iou": i})
        gt = _instance_truth(root, name) if task == "monuseg" else None
        if gt is not None:  # instance metrics where the XML nuclei exist (13 of the 30 tiles)
            from .nuclei.evaluation import score_tile

            rows[-1].update(score_tile(prob, gt, tuple(mask.shape))[0].to_dict())
    return EvalResult(task, _mean(rows, "dice"), _mean(rows, "iou"), rows,
                      runner.sampler.num_steps, runner.sampler.votes)


VOLUME_STRIDE = 8  # overlap 0.75 of 32^3 windows (spec section 8)


def volume_windows(shape: tuple[int, ...], size: int, stride: int = VOLUME_STRIDE) -> list[tuple[int, int, int]]:
    """Window corners :func:`predict_volume` visits for a volume of ``shape`` (short axes padded to ``size``)."""
    return window_starts(tuple(max(d, size) for d in shape), size, stride)


def predict_volume(vol: np.ndarray, cfg: ModelConfig, runner: PatchRunner, stride: int = VOLUME_STRIDE,
                   progress: Callable[[int], object] | None = None) -> torch.Tensor:
    """Label map of one volume by a 3D sliding window of cubic patches (axial slices).

    ``progress(n)`` is called after each window with the number of axial slices it sampled, so a
    caller's progress bar counts the same units as the run summary's ``tiles_sampled``.
    """
    size = cfg.image_size
    v = pad_to(torch.from_numpy(normalise_volume(vol)), size)
    acc = torch.zeros(cfg.mask_channels, *v.shape)
    cnt = torch.zeros(v.shape)
    for x0, y0, z0 in volume_windows(vol.shape, size, stride):
        cube = v[x0:x0 + size, y0:y0 + size, z0:z0 + size].permute(2, 0, 1)[:, None]  # (z, 1, x, y)
        keys = [(x0, y0, z0 + s) for s in range(size)]
        prob = runner(normalise(cube, cfg), keys)  # (z, Cm, x, y)
        acc[:, x0:x0 + size, y0:y0 + size, z0:z0 + size] += prob.permute(1, 2, 3, 0)
        cnt[x0:x0 + size, y0:y0 + size, z0:z0 + size] += 1
        if progress is not None:
            progress(size)
    label = (acc / cnt.clamp(min=1)).argmax(0)
    return label[: vol.shape[0], : vol.shape[1], : vol.shape[2]]


def evaluate_hippocampus(data: Path, cfg: ModelConfig, runner: PatchRunner, names: list[str] | None = None,
                         limit: int | None = None, progress: bool = True) -> EvalResult:
    pairs = HippocampusData.read_pairs(data, names)[:limit]
    rows = []
    for name, vol, lab in tqdm(pairs, desc="eval hippocampus", disable=not progress, leave=False):
        pred = predict_volume(vol, cfg, runner)
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

