"""One scheduler for a slide's units spread over workers: a window of units in flight, results in order.

Both distributed runners sample one slide's tiles on several workers while the driver stitches them
in tile order: ``--device a,b`` on one machine (threads, :mod:`.local_bands`) and ``--ray`` (actors,
:mod:`.ray_runner`). They differ only in how a unit is submitted and waited for, which a
:class:`UnitPool` hides; :func:`in_order` is the rest: at most ``window`` units in flight (so the
driver holds that many units of results plus the stitcher's band, whatever the slide's size), any
finished unit is kept until every earlier one is yielded, and a unit whose worker was lost is
resubmitted (with the units that were queued on the same worker) up to ``max_retries`` times.

:func:`run_banded` is the driver's loop over the inputs of such a run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Protocol

from ..wsi.batch import RunReport, TaskRun, run_input
from ..wsi.progress import NullProgress
from ..wsi.readers import SlideError
from .progress import ClusterProgress
from .worker import UnitResult

__all__ = ["UnitPool", "WorkerLost", "in_order", "run_banded"]


class WorkerLost(Exception):
    """The worker of a unit died; ``lost`` are the handles of every unit that died with it."""

    def __init__(self, cause: BaseException, lost: list[Hashable]) -> None:
        super().__init__(str(cause))
        self.cause, self.lost = cause, lost


class UnitPool(Protocol):
    """How units reach workers: submit one, wait for some, fetch a result (or raise :class:`WorkerLost`)."""

    def submit(self, unit: int) -> Hashable: ...

    def wait(self, handles: list[Hashable]) -> list[Hashable]:
        """Handles that are finished (waits a short while; an empty list lets the caller poll progress)."""

    def result(self, handle: Hashable, unit: int) -> UnitResult: ...


def in_order(pool: UnitPool, units: list[range], window: int, max_retries: int = 0,
             describe: Callable[[range], str] = str, on_result: Callable[[int, UnitResult], None] | None = None
             ) -> Iterator[UnitResult]:
    """Each unit's result, in unit order, with at most ``window`` units submitted and not yet yielded."""
    attempts = [0] * len(units)
    running: dict[Hashable, int] = {}
    done: dict[int, UnitResult] = {}
    retry: deque[int] = deque()
    next_submit = next_yield = 0
    while next_yield < len(units):
        while retry:
            u = retry.popleft()
            running[pool.submit(u)] = u
        while next_submit < len(units) and next_submit - next_yield < window:
            running[pool.submit(next_submit)] = next_submit
            next_submit += 1
        while next_yield in done:
            yield done.pop(next_yield)
            next_yield += 1
        if next_yield >= len(units):
            break
        for handle in pool.wait(list(running)):
            u = running.pop(handle)
            try:
                done[u] = pool.result(handle, u)
            except WorkerLost as exc:
                attempts[u] += 1
                if attempts[u] > max_retries:
                    raise SlideError(f"{describe(units[u])}: their worker died {attempts[u]} times (limit "
                                     f"--ray-max-retries {max_retries}); last: {exc.cause}") from None
                retry.appendleft(u)
                retry.extend(running.pop(h) for h in exc.lost if h in running)  # queued on the dead worker
                break  # the handle list is stale: wait again
            if on_result is not None:
                on_result(u, done[u])


def run_banded(todo: list[Path], out_dir: Path, run: TaskRun, names: dict[Path, str], report: RunReport,
               progress: ClusterProgress, echo: Callable[[str], None]) -> None:
    """The driver's loop of a banded run: each input planned, stitched and written here (``run``'s
    sample stream spreads its tiles), in turn, through the one per-input path."""
    for f in todo:
        outcome = run_input(f, out_dir, run, NullProgress(), names[f])
        progress.finished(outcome.status)
        report.add(outcome, echo)
