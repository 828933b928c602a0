"""One slide's tiles spread over the devices of one machine (``--device a,b`` without Ray).

Each :class:`~.worker.SegmentWorker` gets a single-thread executor, so it samples one unit at a
time on its device (the sampler's kernels release the GIL, so the devices run side by side); the
driver, through :func:`~cdal_fast.wsi.batch.run_input`, plans, stitches in tile order and writes.
Units are whole sampler batches (:func:`.units.unit_slices`), so the bytes equal a single-process
run's; at most ``WINDOW_PER_WORKER x workers`` units are in flight, so the driver holds that many
units of results plus the stitcher's one tile row, whatever the slide's size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from ..wsi.pipeline import SlidePlan, TileResult
from .progress import POLL_SECONDS, ClusterProgress, TileCounter, unit_key
from .units import WINDOW_PER_WORKER, unit_slices
from .worker import SegmentWorker, UnitResult, light_plan

__all__ = ["LocalBandStream", "UnitStats"]


@dataclass
class UnitStats:
    """What one worker sampled for the run summary."""

    units: int = 0
    tiles: int = 0
    seconds: float = 0.0


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
        light = light_plan(slide)
        window = WINDOW_PER_WORKER * len(self.workers)
        inflight: deque[tuple[int, int, Future[UnitResult]]] = deque()  # (unit, worker index, future), unit order
        try:
            for u, unit in enumerate(units):
                while len(inflight) >= window:
                    yield from self._take(inflight, units, key)
                busy = [0] * len(self.workers)
                for _, w, fut in inflight:
                    busy[w] += not fut.done()
                w = min(range(len(self.workers)), key=busy.__getitem__)
                inflight.append((u, w, self.executors[w].submit(
                    self.workers[w].sample_unit, light, list(unit), self.counter, unit_key(key, u))))
            while inflight:
                yield from self._take(inflight, units, key)
        finally:  # the slide failed (or the consumer stopped): queued units are dropped, running ones finish
            for _, _, fut in inflight:
                fut.cancel()

    def _take(self, inflight: deque, units: list[range], key: str) -> Iterator[TileResult]:
        """Wait for the oldest unit (drawing the bar meanwhile), record it and yield its results."""
        u, _, fut = inflight.popleft()
        while self.progress is not None and not wait([fut], timeout=POLL_SECONDS).done:
            self.progress.observe(self.counter.snapshot())
        result: UnitResult = fut.result()
        n = len(units[u])
        s = self.stats.setdefault(result.worker, UnitStats())
        s.units, s.tiles, s.seconds = s.units + 1, s.tiles + n, s.seconds + result.seconds
        if self.progress is not None:
            self.progress.settle(unit_key(key, u), 0, n)
        yield from result.results

    def shutdown(self) -> None:
        for ex in self.executors:
            ex.shutdown(wait=True, cancel_futures=True)
