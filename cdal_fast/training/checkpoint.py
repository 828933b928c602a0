"""Training checkpoints (resumable, every RNG state included) and the export of selected weights.

Apart from the loop so that what a checkpoint holds is in one place: a resumed run restores the
networks, EMA, optimisers, schedulers, the training generator and the CPU RNG, and continues bit
for bit. Only rank 0 writes; every file goes through :func:`cdal_fast.atomic.atomic_output`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from ..atomic import atomic_output
from ..network.config import ModelConfig
from ..network.generator import Generator
from ..weights import save_weights

__all__ = ["Checkpointable", "state_dict", "load_state_dict", "save_checkpoint", "load_checkpoint", "export_best"]


class Checkpointable(Protocol):
    """The trainer attributes a checkpoint holds."""

    step: int
    best_dice: float
    init_sha256: str
    G: torch.nn.Module
    D: torch.nn.Module | None  # None in a generator-only run
    ema: torch.nn.Module | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    sched_g: torch.optim.lr_scheduler.LRScheduler
    sched_d: torch.optim.lr_scheduler.LRScheduler | None
    gen: torch.Generator
    cfg: ModelConfig


def _state(part: Any) -> dict[str, Any] | None:
    return part.state_dict() if part is not None else None


def state_dict(t: Checkpointable, train_config: dict[str, Any]) -> dict[str, Any]:
    """Everything a resumed run needs; the D entries are None in a generator-only run."""
    return {
        "step": t.step, "best_dice": t.best_dice,
        "G": t.G.state_dict(), "D": _state(t.D), "ema": _state(t.ema),
        "opt_g": t.opt_g.state_dict(), "opt_d": _state(t.opt_d),
        "sched_g": t.sched_g.state_dict(), "sched_d": _state(t.sched_d),
        "gen": t.gen.get_state(), "cpu_rng": torch.get_rng_state(),
        "model": t.cfg.to_dict(), "train": json.dumps(train_config),
        "init_sha256": t.init_sha256,
    }


def load_state_dict(t: Checkpointable, st: dict[str, Any]) -> None:
    """Restore ``st`` into ``t``. A trainer without D ignores a saved D (generator-only checkpoints
    written before D was dropped from that mode carry an untrained one); a trainer with D needs one."""
    if t.D is not None and st.get("D") is None:
        raise ValueError("checkpoint holds no discriminator (a generator-only run): "
                         "it cannot resume a run that trains D")
    t.step, t.best_dice = int(st["step"]), float(st["best_dice"])
    t.init_sha256 = str(st.get("init_sha256", ""))  # a resumed fine-tune keeps its provenance
    t.G.load_state_dict(st["G"])
    if t.ema is not None and st.get("ema") is not None:
        t.ema.load_state_dict(st["ema"])
    t.opt_g.load_state_dict(st["opt_g"])
    t.sched_g.load_state_dict(st["sched_g"])
    if t.D is not None:
        t.D.load_state_dict(st["D"])
        t.opt_d.load_state_dict(st["opt_d"])
        t.sched_d.load_state_dict(st["sched_d"])
    t.gen.set_state(st["gen"])
    torch.set_rng_state(st["cpu_rng"])


def save_checkpoint(path: Path, state: dict[str, Any], rank: int = 0) -> Path:
    """Write ``state`` to ``path`` on rank 0 (renamed when complete); every rank gets the path back."""
    if rank == 0:
        with atomic_output(path) as tmp:
            torch.save(state, tmp)
    return path


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any] | None:
    """The state saved at ``path``, or None when there is none."""
    if not path.is_file():
        return None
    return torch.load(path, map_location=device, weights_only=True)


def export_best(out: Path, generator: Generator, provenance: dict[str, Any], init_sha256: str = "") -> None:
    """Selected weights as safetensors + JSON, with the run's provenance (and the weights it started from)."""
    prov = dict(provenance)
    if init_sha256:
        prov["init_sha256"] = init_sha256
    save_weights(out, generator, provenance=prov)
