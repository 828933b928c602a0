"""One slide's tiles spread over the devices of one machine (``--device a,b`` without Ray).

Each :class:`~.worker.SegmentWorker` gets a single-thread executor, so it samples one unit at a
time on its device (the sampler's kernels release the GIL, so the devices run side by side); the
driver, through :func:`~cdal_fast.wsi.batch.run_input`, plans, stitches in tile order and writes.
Units are whole sampler batches (:func:`.units.unit_slices`), so the bytes equal a single-process
run's; the window and the ordering are the shared scheduler's (:func:`.scheduler.in_order`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from ..wsi.pipeline import SlidePlan, TileResult
from .progress import POLL_SECONDS, ClusterProgress, TileCounter, unit_key
from .scheduler import in_order
from .units import WINDOW_PER_WORKER, unit_slices
from .worker import SegmentWorker, UnitResult, light_plan

__all__ = ["LocalBandStream", "UnitStats"]


@dataclass
class UnitStats:
    """What one worker sampled for the run summary."""

    units: int = 0
    tiles: int = 0
    seconds: float = 0.0


class _ThreadPool:
    """Units to the least busy worker's executor; waiting draws the progress bar."""

    def __init__(self, stream: LocalBandStream, slide: SlidePlan, units: list[range], key: str) -> None:
        self.stream, self.units, self.key = stream, units, key
        self.light = light_plan(slide)
        self.owner: dict[Future, int] = {}

    def submit(self, unit: int) -> Hashable:
        s = self.stream
        busy = [0] * len(s.workers)
        for fut, w in self.owner.items():
            busy[w] += not fut.done()
        w = min(range(len(s.workers)), key=busy.__getitem__)
        fut = s.executors[w].submit(s.workers[w].sample_unit, self.light, list(self.units[unit]), s.counter,
                                    unit_key(self.key, unit))
        self.owner[fut] = w
        return fut

    def wait(self, handles: list[Hashable]) -> list[Hashable]:
        finished, _ = wait(handles, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
        if not finished and self.stream.progress is not None:
            self.stream.progress.observe(self.stream.counter.snapshot())
        return list(finished)

    def result(self, handle: Hashable, unit: int) -> UnitResult:
        self.owner.pop(handle)  # type: ignore[arg-type]
        return handle.result()  # type: ignore[attr-defined]  # a failed unit raises here: the slide fails


class LocalBandStream:
    """A ``SampleStream`` that hands a slide's units to the local workers and yields results in tile order."""

    def __init__(self, workers: list[SegmentWorker], batch_size: int, counter: TileCounter,
                 progress: ClusterProgress | None = None, band_rows: int = 1) -> None:
        self.workers, self.batch_size, self.band_rows = workers, max(batch_size, 1), band_rows
        self.counter, self.progress = counter, progress
        self.executors = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cdal-unit-{i}")
                          for i in range(len(workers))]
        self.stats: dict[str, UnitStats] = {}

    def __call__(self, slide: SlidePlan, steps: int, votes: int) -> Iterator[TileResult]:
        key = str(slide.path)
        if self.progress is not None:
            self.progress.expect(key, len(slide.tiles))
        units = unit_slices(len(slide.tiles), slide.grid.cols, self.batch_size, self.band_rows)
        pool = _ThreadPool(self, slide, units, key)

        def record(u: int, result: UnitResult) -> None:
            n = len(units[u])
            s = self.stats.setdefault(result.worker, UnitStats())
            s.units, s.tiles, s.seconds = s.units + 1, s.tiles + n, s.seconds + result.seconds
            if self.progress is not None:
                self.progress.settle(unit_key(key, u), 0, n)

        try:
            for result in in_order(pool, units, WINDOW_PER_WORKER * len(self.workers), on_result=record):
                yield from result.results
        finally:  # the slide failed (or the consumer stopped): queued units are dropped, running ones finish
            for fut in pool.owner:
                fut.cancel()

    def shutdown(self) -> None:
        for ex in self.executors:
            ex.shutdown(wait=True, cancel_futures=True)
