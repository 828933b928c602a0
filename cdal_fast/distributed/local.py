"""One node, several devices, no Ray: one :class:`SegmentWorker` per device, whole inputs from a queue.

Each worker runs in a thread of this process (the sampler's kernels release the GIL; tile reading
keeps its own ``--workers`` processes), through the same per-input path as every other runner, so
outputs are the ones a single-device run writes on that device type.
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

from ..wsi.batch import InputOutcome, RunReport, error_text, run_summary_name
from ..wsi.outputs import output_names, write_summary
from .worker import SegmentWorker, WorkerSpec

__all__ = ["run_on_devices"]


def run_on_devices(files: list[Path], out_dir: Path, spec: WorkerSpec, devices: list[torch.device], echo=print,
                   shard: tuple[int, int] = (0, 1), names: dict[Path, str] | None = None,
                   ) -> tuple[RunReport, dict[str, Any]]:
    """Segment ``files`` with one worker per device; returns the report and the run summary (also written).

    ``names``: the output names (``outputs.output_names``; default: computed here, collisions raise).
    """
    if names is None:
        names = output_names(files)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    workers = [SegmentWorker(replace(spec, device=str(d))) for d in devices]
    todo: queue.Queue[Path] = queue.Queue()
    for f in files:
        todo.put(f)
    outcomes: queue.Queue[tuple[InputOutcome, str, float]] = queue.Queue()

    def drain(worker: SegmentWorker) -> None:
        while True:
            try:
                f = todo.get_nowait()
            except queue.Empty:
                return
            try:
                outcomes.put(worker.run_input(str(f), str(out_dir), names[f]))
            except Exception as exc:  # noqa: BLE001 - the driver waits for one outcome per input
                outcomes.put((InputOutcome(str(f), "failed", error=error_text(exc),
                                           traceback=traceback.format_exc()), worker.name, 0.0))

    threads = [threading.Thread(target=drain, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    report = RunReport()
    per_worker: dict[str, dict[str, float]] = {}
    try:
        for _ in files:
            outcome, name, seconds = outcomes.get()
            report.add(outcome, echo)
            s = per_worker.setdefault(name, {"inputs": 0, "busy_seconds": 0.0})
            s["inputs"] += 1
            s["busy_seconds"] += seconds
        for t in threads:
            t.join()
    except BaseException:
        report.interrupted = True
        raise
    finally:  # written however the run ends (also on Ctrl-C, with "interrupted": true)
        report.seconds = time.perf_counter() - t0
        summary = report.to_dict() | {"devices": [str(d) for d in devices], "per_worker": per_worker}
        write_summary(out_dir / run_summary_name(*shard), summary)
    return report, summary
