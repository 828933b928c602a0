"""`segment` for the two non-slide tasks: chest radiographs and hippocampus MRI volumes.

* Radiographs (PNG/JPEG, any size): the whole image is resized to the model size (the published
  protocol scores whole 256x256 images), sampled, and the probability resized back; the mask is a
  PNG of the input's size (255 = lung).
* Volumes (NIfTI): a 3D sliding window of cubic patches (overlap 0.75), each processed as axial
  slices, exactly as :func:`cdal_fast.sampling.inference.predict_volume`; the label map is written as NIfTI
  with the input's affine and header (0 background, 1 anterior, 2 posterior).

Both write under temporary names, rename when complete and finish with a JSON summary that marks
the input done, like slides.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_output
from ..extras import import_extra
from ..network.config import ModelConfig
from ..sampling.decode import labels_to_mask, to_labels
from ..sampling.inference import PatchRunner, predict_image, predict_volume, volume_windows
from ..sampling.preprocess import match_channels
from .outputs import complete_summary, write_png, write_summary
from .progress import NullProgress, TileProgress
from .readers import SlideError

__all__ = ["VOLUME_SUFFIXES", "is_volume", "volume_stem", "segment_radiograph", "radiograph_done", "segment_volume",
           "volume_done"]

VOLUME_SUFFIXES = (".nii", ".nii.gz")


def is_volume(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def volume_stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem


def radiograph_done(out_dir: Path, path: Path) -> dict[str, Any] | None:
    """A radiograph is done when its summary says complete: that summary, else None."""
    return complete_summary(out_dir / f"{path.stem}.json")


def volume_done(out_dir: Path, path: Path) -> dict[str, Any] | None:
    """A volume is done when its summary says complete (non-volume names use their plain stem): that
    summary, else None."""
    return complete_summary(out_dir / f"{volume_stem(path) if is_volume(path) else path.stem}.json")


def segment_radiograph(path: Path, out_dir: Path, runner: PatchRunner, cfg: ModelConfig,
                       model_info: dict | None = None, progress: TileProgress | None = None) -> dict[str, Any]:
    """Whole radiograph at the model size, probability resized back, PNG mask at the input's size."""
    from PIL import Image

    t0 = time.perf_counter()
    progress = progress or NullProgress()
    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))
    except Exception as exc:
        raise SlideError(f"{path}: not a readable image ({exc})") from exc
    h, w = grey.shape
    img = match_channels(torch.from_numpy(grey.copy()).float()[None], cfg.img_channels)
    progress.set_total(1)
    prob = predict_image(img, cfg, runner)  # (C_mask, S, S)
    progress.update(1)
    full = torch.nn.functional.interpolate(prob[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    mask = labels_to_mask(to_labels(full, cfg).numpy(), cfg)  # 255 = object, or class labels
    out = out_dir / f"{path.stem}.mask.png"
    write_png(out, mask)
    seconds = time.perf_counter() - t0
    summary = {"complete": True, "input": str(path), "outputs": {"mask": str(out)}, "size": [w, h],
               "object_fraction": float((mask > 0).mean()), "seconds": seconds, "tiles_sampled": 1,
               "steps": runner.sampler.num_steps, "votes": runner.sampler.votes, "seed": runner.seed,
               "model": model_info or {}}
    write_summary(out_dir / f"{path.stem}.json", summary)
    return summary


def segment_volume(path: Path, out_dir: Path, runner: PatchRunner, cfg: ModelConfig,
                   model_info: dict | None = None, progress: TileProgress | None = None) -> dict[str, Any]:
    """Label map of a NIfTI volume by the evaluation protocol's sliding window, written with its affine."""
    nib = import_extra("nibabel", f"{path}: reading NIfTI volumes", SlideError)
    t0 = time.perf_counter()
    progress = progress or NullProgress()
    if not is_volume(path):
        raise SlideError(f"{path}: the hippocampus model segments NIfTI volumes (.nii, .nii.gz)")
    try:
        img = nib.load(str(path))
        vol = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise SlideError(f"{path}: not a readable NIfTI volume ({exc})") from exc
    if vol.ndim != 3:
        raise SlideError(f"{path}: expected a 3D volume, got shape {vol.shape}")
    progress.set_total(len(volume_windows(vol.shape, cfg.image_size)) * cfg.image_size)
    labels = predict_volume(vol, cfg, runner, progress=progress.update, affine=img.affine).numpy().astype(np.uint8)
    stem = volume_stem(path)
    out = out_dir / f"{stem}.labels.nii.gz"
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    with atomic_output(out) as tmp:  # the partial name keeps .nii.gz: nibabel picks the format from it
        nib.save(nib.Nifti1Image(labels, img.affine, header), str(tmp))
    seconds = time.perf_counter() - t0
    slices = len(volume_windows(vol.shape, cfg.image_size)) * cfg.image_size
    summary = {"complete": True, "input": str(path), "outputs": {"labels": str(out)}, "shape": list(vol.shape),
               "class_voxels": {str(c): int((labels == c).sum()) for c in range(cfg.mask_channels)},
               "seconds": seconds, "tiles_sampled": slices, "steps": runner.sampler.num_steps,
               "votes": runner.sampler.votes, "seed": runner.seed, "model": model_info or {}}
    write_summary(out_dir / f"{stem}.json", summary)
    return summary
