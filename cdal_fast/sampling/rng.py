"""Counter-based Gaussian noise from a seed, in plain tensor ops.

Exported samplers (TorchScript, torch.export / AOTInductor) cannot take a ``torch.Generator``, and
their noise must be identical in Python, in C++ and on any device so that results can be compared.
Each element's value is a pure function of (seed, stream, element index): a 32-bit integer hash
(Wellons' "lowbias32") gives two uniforms, Box-Muller turns them into a normal deviate. All integer
arithmetic stays below 2^63 (32-bit products are split into 16-bit halves), so no compiler's
overflow rules can change the result.
"""

from __future__ import annotations

import math

import torch

__all__ = ["hash32", "counter_normal"]


def _mul32(a: torch.Tensor, b: int) -> torch.Tensor:
    """(a * b) mod 2^32 for 0 <= a, b < 2^32 without int64 overflow."""
    lo = (a & 0xFFFF) * b
    hi = (((a >> 16) * b) & 0xFFFF) << 16
    return (lo + hi) & 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding 32-bit values."""
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def counter_normal(shape: list[int], seed: torch.Tensor, stream: int) -> torch.Tensor:
    """N(0, 1) float32 tensor of ``shape``; ``seed`` is an int64 tensor (any shape with one value)."""
    n = 1
    for s in shape:
        n = n * s
    s64 = seed.reshape(-1)[:1].to(torch.int64)
    key = hash32(hash32(s64 & 0xFFFFFFFF) ^ ((s64 >> 32) & 0xFFFFFFFF) ^ ((stream * 0x632BE5AB) & 0xFFFFFFFF))
    idx = torch.arange(n, dtype=torch.int64, device=seed.device)
    h1 = hash32((idx * 2) ^ key)
    h2 = hash32((idx * 2 + 1) ^ key)
    u1 = (h1.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)
    u2 = (h2.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.to(torch.float32).reshape(shape)
