"""`segment` for the two non-slide tasks: chest radiographs and hippocampus MRI volumes.

* Radiographs (PNG/JPEG, any size): the whole image is resized to the model size (the published
  protocol scores whole 256x256 images), sampled, and the probability resized back; the mask is a
  PNG of the input's size (255 = lung).
* Volumes (NIfTI): a 3D sliding window of cubic patches (overlap 0.75), each processed as axial
  slices, exactly as :func:`cdal_fast.evaluate.predict_volume`; the label map is written as NIfTI
  with the input's affine and header (0 background, 1 anterior, 2 posterior).

Both write under temporary names, rename when complete and finish with a JSON summary that marks
the input done, like slides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_output
from ..config import ModelConfig
from ..data.imageio import resize_image
from ..evaluate import PatchRunner, predict_volume, volume_windows
from ..preprocess import match_channels, normalise
from ..sampler import decode_mask
from .pipeline import write_png, write_summary
from .readers import SlideError

__all__ = ["VOLUME_SUFFIXES", "is_volume", "volume_stem", "segment_radiograph", "segment_volume"]

VOLUME_SUFFIXES = (".nii", ".nii.gz")


def is_volume(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def volume_stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem


def segment_radiograph(path: Path, out_dir: Path, runner: PatchRunner, cfg: ModelConfig,
                       model_info: dict | None = None,
                       progress: Callable[[int], object] | None = None) -> dict[str, Any]:
    from PIL import Image

    t0 = time.perf_counter()
    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))
    except Exception as exc:
        raise SlideError(f"{path}: not a readable image ({exc})") from exc
    h, w = grey.shape
    img = match_channels(torch.from_numpy(grey.copy()).float()[None], cfg.img_channels)
    small = resize_image(img, cfg.image_size)
    prob = runner(normalise(small[None], cfg), [(0, 0)])[0]  # (C_mask, S, S)
    if progress is not None:
        progress(1)
    full = torch.nn.functional.interpolate(prob[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    mask = decode_mask(full[None])[0].numpy()  # 0/1, or class labels
    if cfg.mask_channels == 1:
        mask = mask * 255
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
                   model_info: dict | None = None,
                   progress: Callable[[int], object] | None = None) -> dict[str, Any]:
    import nibabel as nib

    t0 = time.perf_counter()
    try:
        img = nib.load(str(path))
        vol = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise SlideError(f"{path}: not a readable NIfTI volume ({exc})") from exc
    if vol.ndim != 3:
        raise SlideError(f"{path}: expected a 3D volume, got shape {vol.shape}")
    labels = predict_volume(vol, cfg, runner, progress=progress, affine=img.affine).numpy().astype(np.uint8)
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
