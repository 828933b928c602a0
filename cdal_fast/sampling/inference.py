"""Running a sampler over images and volumes: the inference half of ``eval`` and ``segment``.

Scoring (:mod:`cdal_fast.evaluate`) and the slide / radiograph / volume jobs (:mod:`cdal_fast.wsi`)
both build on this module; it imports neither them nor the training data package.

Noise is keyed by the patch position (:func:`cdal_fast.sampling.sampler.position_generator`), so a patch
gets the same noise whatever batch it runs in, and ``segment`` on the same geometry reproduces
``eval``'s numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..network.config import ModelConfig
from .decode import to_labels
from .imageio import resize_image
from .preprocess import normalise, orient_volume, scale_volume
from .sampler import SamplerLike, position_generator, sample
from .volume import pad_to, window_starts

__all__ = ["DTYPES", "PatchRunner", "predict_monuseg_tile", "predict_image", "VOLUME_STRIDE", "volume_windows",
           "predict_volume"]

# Compute precisions a user may pick by name (``--dtype``); the benchmarks use the same table.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

MONUSEG_WORK_SIZE = 512  # section 8: a tile is resized to 512x512 and cut into model-size patches
VOLUME_STRIDE = 8  # overlap 0.75 of 32^3 windows (spec section 8)


class PatchRunner:
    """Run a sampler over normalised patches in batches with position-keyed noise."""

    def __init__(self, sampler: SamplerLike, device: torch.device | str = "cpu",
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


def predict_monuseg_tile(image_chw: torch.Tensor, cfg: ModelConfig, runner: PatchRunner,
                         work_size: int = MONUSEG_WORK_SIZE) -> torch.Tensor:
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


def predict_image(image_chw: torch.Tensor, cfg: ModelConfig, runner: PatchRunner) -> torch.Tensor:
    """Probabilities (C_mask, S, S) of a whole image resized to the model size S (the cxr protocol)."""
    return runner(normalise(resize_image(image_chw, cfg.image_size)[None], cfg), [(0, 0)])[0]


def volume_windows(shape: tuple[int, ...], size: int, stride: int = VOLUME_STRIDE) -> list[tuple[int, int, int]]:
    """Window corners :func:`predict_volume` visits for a volume of ``shape`` (short axes padded to ``size``)."""
    return window_starts(tuple(max(d, size) for d in shape), size, stride)


def predict_volume(vol: np.ndarray, cfg: ModelConfig, runner: PatchRunner, stride: int = VOLUME_STRIDE,
                   progress: Callable[[int], object] | None = None,
                   affine: np.ndarray | None = None) -> torch.Tensor:
    """Label map of one volume by a 3D sliding window of cubic patches (axial slices).

    The volume is first put in the model's orientation (``affine`` is needed for models that carry
    one, e.g. the authors' LPI) and scaled as the model was trained; the label map is returned on
    the input's own grid.

    ``progress(n)`` is called after each window with the number of axial slices it sampled, so a
    caller's progress bar counts the same units as the run summary's ``tiles_sampled``.
    """
    size = cfg.image_size
    vol, to_input_grid = orient_volume(vol, affine, cfg)
    v = pad_to(torch.from_numpy(scale_volume(vol, cfg)), size)
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
    label = to_labels(acc / cnt.clamp(min=1), cfg, axis=0).long()
    label = label[: vol.shape[0], : vol.shape[1], : vol.shape[2]]
    return label if cfg.volume_orientation == "native" else torch.from_numpy(to_input_grid(label.numpy()))
