"""The original cDAL implementation's per-tile inference protocol, written from the spec (section 3).

This is the baseline every CPU path of ``bench/cpu_tile.py`` is compared with. It reproduces the
*protocol* of the authors' evaluation, not a faster equivalent:

* each vote is its own batch-1 run (the votes are never stacked into one batch);
* each of the T steps calls the full generator ``G(x, k, y, z)``, so the condition encoder runs
  again on the same image in every call (T x V times per tile instead of once);
* plain float32 eager PyTorch, no fused ops, no change of memory layout or denormal handling.

It consumes the noise in the sampler's layout (:class:`~cdal_fast.sampling.sampler.SamplerNoise`, vote-major
rows), so on the same noise it must give what the batched sampler gives up to float32 rounding;
``tests/test_cpu_speed.py`` checks it against the authors' recorded sampling.
"""

from __future__ import annotations

import torch

from cdal_fast.network.diffusion import make_schedule
from cdal_fast.network.generator import Generator
from cdal_fast.sampling.preprocess import object_sign

__all__ = ["authors_tile"]


@torch.inference_mode()
def authors_tile(generator: Generator, image: torch.Tensor, x_init: torch.Tensor, z: torch.Tensor,
                 post_noise: torch.Tensor, num_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image (1, C_img, H, W) -> (vote-mean probability, vote std), each (1, C_mask, H, W).

    ``x_init`` (V, C_mask, H, W), ``z`` (T, V, nz), ``post_noise`` (T, V, C_mask, H, W): row ``v``
    is vote ``v``; ``z[i]`` and ``post_noise[i]`` belong to the i-th step taken (k = T-1-i).
    """
    if image.shape[0] != 1:
        raise ValueError(f"the authors' protocol runs one image at a time; got a batch of {image.shape[0]}")
    steps = int(num_steps if num_steps is not None else z.shape[0])
    sched = make_schedule(steps, generator.cfg.beta_min, generator.cfg.beta_max)
    c1, c2 = sched.post_c1, sched.post_c2
    post_std = torch.exp(0.5 * sched.post_logvar)
    sign = object_sign(generator.cfg)
    probs = []
    for v in range(x_init.shape[0]):
        x = x_init[v:v + 1]
        for i in range(steps):
            k = steps - 1 - i
            x0_hat = generator(x, torch.full((1,), k, dtype=torch.long, device=image.device), image, z[i, v:v + 1])
            x = c1[k] * x0_hat + c2[k] * x
            if k > 0:
                x = x + post_std[k] * post_noise[i, v:v + 1]
        probs.append(torch.clamp((sign * x + 1.0) * 0.5, 0.0, 1.0))
    p = torch.cat(probs, 0)
    return p.mean(0, keepdim=True), p.std(0, unbiased=False, keepdim=True)
