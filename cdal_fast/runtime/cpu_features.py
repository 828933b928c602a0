"""What this CPU can do natively in reduced precision, read once at run time.

Lower precision only pays where the hardware has it: bfloat16 dot products need AVX-512 BF16 or AMX
(elsewhere bfloat16 is emulated and slower than float32), and int8 convolutions need VNNI (AVX-512
VNNI, AVX-VNNI or AMX-INT8). ``--backend auto`` reads this to decide whether a reduced-precision
path is a candidate at all (:mod:`.backend_choice`); ``cdal-fast info`` prints it.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["CpuFeatures", "cpu_features", "BF16_FLAGS", "VNNI_FLAGS"]

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
REPORTED = ("avx2", "fma", "avx512f", *BF16_FLAGS, *VNNI_FLAGS)


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    flags: frozenset[str]
    isa: str  # PyTorch's own dispatch level (default, avx2, avx512, avx512_vnni, avx512_bf16, amx, ...)

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def vnni(self) -> bool:
        return any(f in self.flags for f in VNNI_FLAGS)

    def describe(self) -> str:
        have = [f for f in REPORTED if f in self.flags]
        return (f"{self.model}: {' '.join(have) or 'no SIMD flags read'} (PyTorch ISA {self.isa}); "
                f"native bf16 {'yes' if self.native_bf16 else 'no'}, int8 VNNI {'yes' if self.vnni else 'no'}")

    @classmethod
    def parse(cls, cpuinfo: str, isa: str = "") -> CpuFeatures:
        """From the text of ``/proc/cpuinfo`` (the first processor's model name and flags)."""
        model, flags = platform.machine(), frozenset()
        for line in cpuinfo.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == platform.machine():
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = frozenset(value.split())
        return cls(model, flags, isa)


@lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This machine's CPU (Linux ``/proc/cpuinfo``; elsewhere no flags, so no reduced-precision path)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return CpuFeatures.parse(text, torch.backends.cpu.get_cpu_capability().lower())
