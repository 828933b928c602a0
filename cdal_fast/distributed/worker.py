"""A segmentation worker: loads the job's model once, then runs whole inputs or units of one slide's tiles.

The same class is a Ray actor (``ray.remote(SegmentWorker)``) and a plain object in one process, so
the Ray path and a single-process run execute the same code per input (:func:`run_input`) and per
tile batch (:func:`read_tiles` + :func:`sample_tiles`); only where it runs differs.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..job import SegmentJob
from ..network.config import ModelConfig
from ..wsi.batch import InputOutcome, TaskRun, run_input
from ..wsi.pipeline import SlidePlan, TileResult, read_tiles, sample_tiles
from ..wsi.progress import NullProgress
from ..wsi.readers import SlideError
from .progress import CounterReporter, sender

__all__ = ["SamplerShape", "UnitResult", "SegmentWorker", "light_plan", "unreachable_input"]


@dataclass(frozen=True)
class SamplerShape:
    """What the driver of a distributed slide needs from a sampler without holding one."""

    num_steps: int
    votes: int


@dataclass
class UnitResult:
    """One unit's sampled batches (global tile indices) and where and how long it ran."""

    results: list[TileResult]
    worker: str
    seconds: float
    cpu_seconds: float = 0.0  # CPU time of the worker's whole process meanwhile (Ray: its own threads too)


def unreachable_input(path: Path) -> str:
    """The message of a worker that cannot see an input the driver found (no shared filesystem)."""
    return (f"worker {socket.gethostname()} (pid {os.getpid()}) cannot open {path}, which the driver planned: "
            "every node must see the inputs and --out at the same path (a shared filesystem such as NFS, "
            "Lustre or a mounted bucket)")


def light_plan(slide: SlidePlan) -> SlidePlan:
    """The plan without what only the driver uses (thumbnail, tissue mask, ROI): cheap to ship to workers."""
    return replace(slide, thumbnail=np.zeros((1, 1, 3), dtype=np.uint8), tissue=None, roi=None)


class SegmentWorker:
    """Holds one model on one device; Ray creates one per actor, the local multi-device runner one per device."""

    def __init__(self, job: SegmentJob) -> None:
        from ..models import load_model

        if job.threads:
            torch.set_num_threads(job.threads)
        name = job.sampler.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        job = job.on_device(str(device), job.threads)
        bundle = load_model(job.model.weights, task=job.task, device=device, model=job.model.model)
        self.job = job
        self.run = TaskRun.local(job, job.build_sampler(bundle.generator, device), bundle.config, device)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{device}"

    def identity(self) -> dict[str, Any]:
        """Host, pid, device, niceness and torch threads (the fault-tolerance tests use the pid)."""
        return {"worker": self.name, "pid": os.getpid(), "host": socket.gethostname(),
                "device": str(self.run.device), "nice": os.nice(0), "threads": torch.get_num_threads()}

    def shape(self) -> tuple[SamplerShape, ModelConfig]:
        """Steps, votes and config: what a driver that stitches and writes needs, without a model."""
        return SamplerShape(int(self.run.sampler.num_steps), int(self.run.sampler.votes)), self.run.cfg

    def run_input(self, path: str, out_dir: str, name: str | None = None,
                  counter: Any = None) -> tuple[InputOutcome, str, float, float]:
        """One whole input through the batch runner's per-input path (its lock, its output ``name``:
        the driver's unique names, so outputs land where a single-process run puts them);
        (outcome, worker, seconds, CPU seconds of this process). ``counter``: a
        :class:`~.progress.TileCounter` (or its Ray actor) that gets the input's tile total and, per
        batch (throttled), the tiles sampled, under ``path``."""
        t0, c0 = time.perf_counter(), time.process_time()
        p = Path(path)
        progress = CounterReporter(sender(counter), path) if counter is not None else NullProgress()
        if not p.exists():
            outcome = InputOutcome(path, "failed", error=unreachable_input(p))
        else:
            outcome = run_input(p, Path(out_dir), self.run, progress, name)
        return outcome, self.name, time.perf_counter() - t0, time.process_time() - c0

    def sample_unit(self, slide: SlidePlan, indices: list[int], counter: Any = None, key: str = "") -> UnitResult:
        """Sample the tiles ``slide.tiles[indices]`` (consecutive, whole batches of the single-process run);
        with a ``counter``, the tiles sampled are reported per batch (throttled) under ``key``."""
        t0, c0 = time.perf_counter(), time.process_time()
        progress = CounterReporter(sender(counter), key) if counter is not None else NullProgress()
        progress.set_total(0)  # the driver knows the slide's total; a retried unit restarts from zero
        if not slide.path.exists():
            raise SlideError(unreachable_input(slide.path))
        part = replace(slide, tiles=[slide.tiles[i] for i in indices])
        opts = replace(self.run.opts, workers=0)  # a unit is a few batches: loader processes cost more than they save
        steps, votes = int(self.run.sampler.num_steps), int(self.run.sampler.votes)
        results = []
        for batch in read_tiles(part, self.run.cfg, opts, steps, votes):
            res = sample_tiles(self.run.sampler, batch, self.run.device, self.run.dtype)
            res.indices = [indices[i] for i in res.indices]
            results.append(res)
            progress.update(len(res.indices))
        return UnitResult(results, self.name, time.perf_counter() - t0, time.process_time() - c0)
