"""Sampler backends selectable from the CLI (``--backend``).

* ``eager``: the plain PyTorch modules.
* ``torchscript``: the same sampler through ``torch.jit.script`` (what the C++ export ships).
* ``fused``: eager with latent modulation and attention routed through the ``cdal`` custom ops.
* ``compile``: ``torch.compile`` of the sampler (useful on GPUs; compiles on first use).

Backends that need something missing fail at start with one message saying what to install.
"""

from __future__ import annotations

import torch

from . import ops
from .generator import Generator
from .sampler import FixedStepSampler

__all__ = ["BACKENDS", "BackendError", "build_sampler"]

BACKENDS = ("eager", "torchscript", "fused", "compile")


class BackendError(RuntimeError):
    """The requested backend cannot run here."""


def build_sampler(generator: Generator, steps: int | None, votes: int | None, backend: str = "eager",
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "fused":
        if not ops.extension_available():
            raise BackendError("backend 'fused' needs the C++ op library: run `bash scripts/setup.sh` "
                               "(or `pip install --no-build-isolation -e .`) to build it")
        generator.set_fused(True)
    else:
        generator.set_fused(False)
    sampler = FixedStepSampler(generator, steps, votes).to(device=device, dtype=dtype).eval()
    # the schedule tables stay float32 whatever the compute dtype
    for name in ("c1", "c2", "post_std"):
        setattr(sampler, name, getattr(sampler, name).float())
    if backend == "torchscript":
        return torch.jit.script(sampler)
    if backend == "compile":
        return torch.compile(sampler, dynamic=False)
    return sampler
