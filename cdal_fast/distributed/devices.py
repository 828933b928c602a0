"""``--device cuda:0,cuda:1`` / ``--device all``: which devices a one-node multi-device run uses.

The parsing is separate from torch's device query (``cuda_count`` is passed in) so the rules,
including the CPU fallback, are tested on machines without a GPU.
"""

from __future__ import annotations

import torch

__all__ = ["DeviceListError", "parse_devices"]

ALL = "all"


class DeviceListError(ValueError):
    """A device list that names something this machine does not have."""


def parse_devices(text: str, cuda_count: int) -> tuple[list[torch.device], str | None]:
    """The devices of ``text`` and a warning when the request fell back to the CPU.

    ``all``: every CUDA device, else the CPU (with a warning); a comma list: exactly those devices,
    every CUDA index below ``cuda_count`` and named at most once (a GPU holds one worker), ``cpu`` as
    often as wanted (each entry one CPU worker sharing this machine's cores); one name: that device.
    """
    text = text.strip()
    if text == ALL:
        if cuda_count == 0:
            return [torch.device("cpu")], "--device all: no CUDA device here, running on the CPU"
        return [torch.device("cuda", i) for i in range(cuda_count)], None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise DeviceListError(f"--device {text!r}: no device named")
    devices = []
    for name in names:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise DeviceListError(f"--device {text!r}: {name!r} is not a device (cpu, cuda, cuda:N)") from None
        if dev.type == "cuda":
            if cuda_count == 0:
                raise DeviceListError(f"--device {text!r}: {name} asked for but this machine has no CUDA device")
            dev = torch.device("cuda", dev.index or 0)
            if dev.index >= cuda_count:
                raise DeviceListError(f"--device {text!r}: {name} does not exist (this machine has {cuda_count} "
                                      f"CUDA device{'s' if cuda_count != 1 else ''}: cuda:0..cuda:{cuda_count - 1})")
        if dev.type == "cuda" and dev in devices:
            raise DeviceListError(f"--device {text!r}: {name} is listed twice")
        devices.append(dev)
    return devices, None
