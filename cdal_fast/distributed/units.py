"""Units of work for one slide split over several workers (Ray actors or local devices).

A unit is a run of consecutive tiles made of whole sampler batches, cut exactly where the
single-process loader cuts its batches, so each batch holds the same tiles (and the same
floating-point sums) whoever samples it. The driver keeps at most ``WINDOW_PER_WORKER`` units per
worker in flight and stitches results in tile order, which bounds its memory by that window.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..job import SegmentJob
from ..wsi.batch import RunReport, finished_outcome

__all__ = ["WINDOW_PER_WORKER", "pending_inputs", "unit_slices"]

WINDOW_PER_WORKER = 2  # units in flight per worker: one running, one queued behind it


def unit_slices(n_tiles: int, tiles_per_row: int, batch_size: int, band_rows: int) -> list[range]:
    """Consecutive tile ranges made of whole batches (as the single-process loader cuts them), ~band_rows rows."""
    per_unit = max(1, -(-tiles_per_row * band_rows // batch_size)) * batch_size
    return [range(s, min(s + per_unit, n_tiles)) for s in range(0, n_tiles, per_unit)]


def pending_inputs(files: list[Path], out_dir: Path, job: SegmentJob, names: dict[Path, str], report: RunReport,
                   echo: Callable[[str], None]) -> list[Path]:
    """The inputs not yet complete; the others are reported now, before any worker starts (a rerun
    after everything finished starts no worker at all): skipped, or failed when their outputs were
    made with other settings (:func:`cdal_fast.wsi.batch.finished_outcome`)."""
    todo = []
    for f in files:
        finished = finished_outcome(job, out_dir / Path(names[f]).parent, f)
        if finished is None:
            todo.append(f)
        else:
            report.add(finished, echo)
    return todo
