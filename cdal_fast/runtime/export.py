"""Export the whole fixed-step sampler for programs without Python.

:class:`ExportableSampler` wraps a generator with everything a C++ caller needs:

    forward(image: float32 (B, C_img, H, W) on the 0-255 scale, seed: int64 tensor ())
        -> (probability (B, C_mask, H, W), uncertainty (B, C_mask, H, W))

Normalisation happens inside; the noise comes from :func:`cdal_fast.sampling.rng.counter_normal`, so the
same image and seed give the same result in Python, TorchScript, AOTInductor and C++. T, V, the
normalisation statistics and the model resolution are fixed at export and stored as attributes.

* ``torchscript``: ``torch.jit.script`` of the module (fused ops called through ``torch.ops.cdal``
  when the op library is loaded at export time; the C++ program must then link ``cdal_ops``).
* ``aoti``: ``torch.export`` + AOTInductor ``.pt2`` package for a fixed batch and tile size.

``tta=True`` bakes test-time augmentation (:mod:`cdal_fast.sampling.dihedral`) into either export; the
module's ``tta`` attribute records it (square tiles use all 8 transforms, others the 4 shape-keeping ones).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_output
from ..network.generator import Generator
from ..sampling.one_pass import sampler_for
from ..sampling.rng import counter_normal

__all__ = ["ExportableSampler", "export_torchscript", "export_aoti"]


class ExportableSampler(nn.Module):
    def __init__(self, generator: Generator, steps: int | None = None, votes: int | None = None,
                 tta: bool = False) -> None:
        super().__init__()
        cfg = generator.cfg
        self.sampler = sampler_for(generator, steps, votes, tta=tta)
        self.tta = bool(tta)
        self.num_steps = self.sampler.num_steps
        self.votes = self.sampler.votes
        self.mask_channels = cfg.mask_channels
        self.img_channels = cfg.img_channels
        self.nz = cfg.nz
        self.image_size = cfg.image_size
        self.size_multiple = 2 ** (len(cfg.ch_mult) - 1)
        self.mpp = float(cfg.mpp or 0.0)  # 0.0: the model has no physical resolution
        self.threshold = float(cfg.threshold)  # binary models: object where prob >= threshold (its config's)
        self.register_buffer("norm_mean", torch.tensor(cfg.norm_mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("norm_std", torch.tensor(cfg.norm_std, dtype=torch.float32).view(1, -1, 1, 1))

    def noise(self, b: int, h: int, w: int, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vb = self.votes * b
        x_init = counter_normal([vb, self.mask_channels, h, w], seed, 0)
        z = counter_normal([self.num_steps, vb, self.nz], seed, 1)
        post = counter_normal([self.num_steps, vb, self.mask_channels, h, w], seed, 2)
        return x_init, z, post

    def forward(self, image: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = image.shape
        if c != self.img_channels:
            raise ValueError("cdal sampler: wrong number of image channels")
        if h % self.size_multiple != 0 or w % self.size_multiple != 0:
            raise ValueError("cdal sampler: image height and width must be multiples of size_multiple")
        x = (image.to(torch.float32) - self.norm_mean) / self.norm_std
        x_init, z, post = self.noise(b, h, w, seed)
        return self.sampler(x, x_init.to(x.device), z.to(x.device), post.to(x.device))


def export_torchscript(module: ExportableSampler, out: str | Path) -> Path:
    scripted = torch.jit.script(module.eval())
    with atomic_output(out) as tmp:
        scripted.save(str(tmp))
    return Path(out)


def export_aoti(module: ExportableSampler, out: str | Path, batch: int = 1, size: int | None = None) -> Path:
    """AOTInductor package for input (batch, C_img, size, size) on the CPU."""
    s = size or module.image_size
    example = (torch.zeros(batch, module.img_channels, s, s), torch.tensor(0, dtype=torch.int64))
    with torch.no_grad(), atomic_output(out) as tmp:
        ep = torch.export.export(module.eval(), example)
        # AOTInductor does not check input shapes at run time: the C++ app checks them against this.
        meta = {"cdal_input_shape": ",".join(str(v) for v in example[0].shape),
                "cdal_steps": str(module.num_steps), "cdal_votes": str(module.votes), "cdal_mpp": str(module.mpp),
                "cdal_threshold": str(module.threshold)}
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp),
                                                 inductor_configs={"aot_inductor.metadata": meta})
    return Path(out)
