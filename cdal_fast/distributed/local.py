"""One node, several devices, no Ray: one :class:`SegmentWorker` per device.

Each worker runs in a thread of this process (the sampler's kernels release the GIL), through the
same per-input path as every other runner, so outputs are the ones a single-device run writes on
that device type. Two ways to share the work, chosen like ``--ray-unit auto``:

* at least as many pending inputs as devices: whole inputs from a queue, one at a time per worker;
* fewer (one big slide on several GPUs): this thread plans, stitches in tile order and writes each
  slide while the workers sample its units of whole batches (:mod:`.local_bands`).

``cpu`` may be listed more than once (``--device cpu,cpu``): each entry is one CPU worker, and the
torch threads are split between them (``threads // workers`` each; torch's thread count is one per
process), which is also the thread count to give a single-process run to compare bytes with.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..job import SegmentJob
from ..wsi.batch import InputOutcome, RunReport, error_text, run_summary_name
from ..wsi.outputs import output_names
from .local_bands import LocalBandStream
from .progress import POLL_SECONDS, ClusterProgress, TileCounter
from .scheduler import run_banded
from .units import pending_inputs
from .worker import SegmentWorker

__all__ = ["run_on_devices", "cpu_threads_per_worker"]


def cpu_threads_per_worker(devices: list[torch.device], threads: int) -> int | None:
    """Torch threads for each CPU worker when several share this process's cores (None: leave as is)."""
    cpus = sum(d.type == "cpu" for d in devices)
    return max(1, threads // cpus) if cpus > 1 else None


def run_on_devices(files: list[Path], out_dir: Path, job: SegmentJob, devices: list[torch.device], echo=print,
                   shard: tuple[int, int] = (0, 1), names: dict[Path, str] | None = None,
                   show_progress: bool = True) -> tuple[RunReport, dict[str, Any]]:
    """Segment ``files`` with one worker per device; returns the report and the run summary (also written).

    ``names``: the output names (``outputs.output_names``; default: computed here, collisions raise).
    """
    if names is None:
        names = output_names(files)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = RunReport.for_batch(out_dir, files, names, job.opts, run_summary_name(*shard))
    per_worker: dict[str, dict[str, float]] = {}
    unit = None
    threads_before = torch.get_num_threads()
    progress = ClusterProgress(len(files), show_progress)
    try:
        todo = pending_inputs(files, out_dir, job, names, report, echo)
        if todo:
            threads = cpu_threads_per_worker(devices, threads_before)
            workers = [SegmentWorker(job.on_device(str(d), threads if d.type == "cpu" else None)) for d in devices]
            for i, w in enumerate(workers):  # one process: the device alone does not tell two CPU workers apart
                w.name = f"{w.name}#{i}"
            counter = TileCounter()
            if job.tiled and len(workers) > 1 and len(todo) < len(workers):
                unit = "band"
                _run_bands(todo, out_dir, workers, counter, job, names, report, progress, per_worker, echo)
            else:
                unit = "input"
                _run_inputs(todo, out_dir, workers, counter, names, report, progress, per_worker, echo)
    except BaseException:
        report.interrupted = True
        raise
    finally:  # written however the run ends (also on Ctrl-C, with "interrupted": true)
        torch.set_num_threads(threads_before)
        progress.close()
        summary = report.finish(t0, out_dir / run_summary_name(*shard),
                                {"devices": [str(d) for d in devices], "unit": unit, "per_worker": per_worker})
    return report, summary


def _run_bands(todo: list[Path], out_dir: Path, workers: list[SegmentWorker], counter: TileCounter,
               job: SegmentJob, names: dict[Path, str], report: RunReport, progress: ClusterProgress,
               per_worker: dict[str, dict[str, float]], echo) -> None:
    """Each slide planned, stitched and written here, its units sampled by all workers."""
    stream = LocalBandStream(workers, job.opts.batch_size, counter, progress)
    try:
        run_banded(todo, out_dir, replace(workers[0].run, sample_stream=stream), names, report, progress, echo)
    finally:
        stream.shutdown()
        for name, s in stream.stats.items():
            per_worker[name] = {"units": s.units, "tiles": s.tiles, "busy_seconds": s.seconds}


def _run_inputs(todo: list[Path], out_dir: Path, workers: list[SegmentWorker], counter: TileCounter,
                names: dict[Path, str], report: RunReport, progress: ClusterProgress,
                per_worker: dict[str, dict[str, float]], echo) -> None:
    """Whole inputs from a queue, one thread per worker; the bar is drawn here while they run."""
    pending: queue.Queue[Path] = queue.Queue()
    for f in todo:
        pending.put(f)
    outcomes: queue.Queue[tuple[InputOutcome, str, float, float]] = queue.Queue()

    def drain(worker: SegmentWorker) -> None:
        while True:
            try:
                f = pending.get_nowait()
            except queue.Empty:
                return
            try:
                outcomes.put(worker.run_input(str(f), str(out_dir), names[f], counter))
            except Exception as exc:  # noqa: BLE001 - the driver waits for one outcome per input
                outcomes.put((InputOutcome(str(f), "failed", error=error_text(exc),
                                           traceback=traceback.format_exc()), worker.name, 0.0, 0.0))

    threads = [threading.Thread(target=drain, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    received = 0
    while received < len(todo):
        try:
            outcome, name, seconds, _cpu = outcomes.get(timeout=POLL_SECONDS)  # CPU: process-wide here
        except queue.Empty:
            progress.observe(counter.snapshot())
            continue
        received += 1
        tiles = (outcome.summary or {}).get("tiles_sampled", 0)
        if outcome.status == "done":
            progress.settle(outcome.path, tiles, tiles)
        progress.finished(outcome.status)
        report.add(outcome, echo)
        s = per_worker.setdefault(name, {"inputs": 0, "busy_seconds": 0.0})
        s["inputs"] += 1
        s["busy_seconds"] += seconds
    for t in threads:
        t.join()
