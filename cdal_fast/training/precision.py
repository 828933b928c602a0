"""Training precision decided once: bf16 autocast and channels_last, for the steps and for validation."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

__all__ = ["Precision"]

AUTOCAST_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Precision:
    """What the training steps and validation run in, fixed for the whole run.

    * ``amp``: bf16 autocast in the D and G steps (CUDA with ``amp``; a CPU with ``cpu_amp``).
    * ``val_amp``: bf16 autocast in validation, on CUDA only: CPU validation scores what the
      shipped model runs on a CPU (float32).
    * ``channels_last``: the networks and image batches in channels-last layout (CUDA, or with amp).
    """

    device_type: str
    amp: bool
    val_amp: bool
    channels_last: bool

    @classmethod
    def decide(cls, device: torch.device, amp: bool, cpu_amp: bool, channels_last: bool) -> Precision:
        cuda = device.type == "cuda"
        val_amp = bool(amp and cuda)
        step_amp = val_amp or (cpu_amp and device.type == "cpu")
        return cls(device.type, step_amp, val_amp, bool(channels_last and (cuda or step_amp)))

    def autocast(self) -> AbstractContextManager:
        """The training steps' autocast context."""
        return torch.autocast(self.device_type, dtype=AUTOCAST_DTYPE, enabled=self.amp)

    def val_autocast(self) -> AbstractContextManager:
        """Validation's autocast context."""
        return torch.autocast(self.device_type, dtype=AUTOCAST_DTYPE, enabled=self.val_amp)
