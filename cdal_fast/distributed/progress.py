"""Per-tile progress of a distributed run: workers report tile counts, the driver draws one bar.

Workers (Ray actors, or threads of a local multi-device run) report into a :class:`TileCounter`
through a :class:`CounterReporter` (the :class:`~cdal_fast.wsi.progress.TileProgress` a job is
given), throttled to one message per :data:`REPORT_SECONDS`, so a GPU sampling dozens of batches a
second sends a few small messages, not one per batch. The driver polls the counter
(:meth:`ClusterProgress.observe`) and, when a unit of work returns, replaces what was reported for
it by the exact count (:meth:`ClusterProgress.settle`): a message still in flight, or the counts of
a unit retried after its worker died, can then neither be lost nor counted twice.

Counts are keyed: a whole input reports under its path; a band unit of a slide under
``PATH#UNIT``. ``report(key, total, done)`` with a ``total`` starts that key afresh (a retried unit
or input restarts from zero), then adds ``done``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["REPORT_SECONDS", "POLL_SECONDS", "TileCounter", "CounterReporter", "ClusterProgress", "sender",
           "unit_key"]

REPORT_SECONDS = 0.5  # a worker sends at most one count message per this interval
POLL_SECONDS = 0.5  # the driver reads the counter at most this often while it waits for results
Send = Callable[[str, "int | None", int], Any]


def unit_key(path: str, unit: int) -> str:
    """The counter key of band unit ``unit`` of the slide at ``path``."""
    return f"{path}#{unit}"


class TileCounter:
    """Reported (total, done) tiles per key; thread-safe, and a Ray actor as is (``num_cpus=0``)."""

    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def report(self, key: str, total: int | None, done: int) -> None:
        """``total`` not None: (re)start ``key`` at ``total`` tiles, none done; then add ``done``."""
        with self._lock:
            if total is not None or key not in self._counts:
                self._counts[key] = [total or 0, 0]
            self._counts[key][1] += done

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """(total, done) per key, as reported so far."""
        with self._lock:
            return {k: (t, d) for k, (t, d) in self._counts.items()}


def sender(sink: Any) -> Send:
    """How to call ``sink.report``: fire-and-forget on a Ray actor handle, a plain call otherwise."""
    method = sink.report
    return method.remote if hasattr(method, "remote") else method


class CounterReporter:
    """The ``TileProgress`` of one job on a worker: counts go to a counter under ``key``, throttled."""

    def __init__(self, send: Send, key: str, interval: float = REPORT_SECONDS) -> None:
        self.send, self.key, self.interval = send, key, interval
        self.pending = 0
        self.last = time.monotonic()

    def set_total(self, tiles: int) -> None:
        self.pending = 0
        self.send(self.key, tiles, 0)
        self.last = time.monotonic()

    def update(self, tiles: int) -> None:
        self.pending += tiles
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.send(self.key, None, self.pending)
            self.pending, self.last = 0, now


class ClusterProgress:
    """One driver bar over the tiles of all inputs (tile/s from tqdm), with inputs done/failed.

    ``observe`` takes a counter snapshot; ``expect`` adds a total the driver knows itself (a slide
    it splits into bands); ``settle`` replaces a key's reported counts by the exact ones when its
    unit returned. The bar shows sum(done) over sum(total) of all keys.
    """

    def __init__(self, count: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=f"{count} inputs", unit="tile", disable=not enabled, dynamic_ncols=True)
        self.done = self.failed = 0
        self.bar.set_postfix_str("done 0, failed 0", refresh=False)
        self.reported: dict[str, tuple[int, int]] = {}
        self.exact: dict[str, tuple[int, int]] = {}

    def observe(self, counts: dict[str, tuple[int, int]]) -> None:
        self.reported.update({k: v for k, v in counts.items() if k not in self.exact})
        self._draw()

    def expect(self, key: str, total: int) -> None:
        self.exact[key] = (total, 0)
        self._draw()

    def settle(self, key: str, total: int, done: int) -> None:
        self.exact[key] = (total, done)
        self.reported.pop(key, None)
        self._draw()

    def counts(self) -> tuple[int, int]:
        """(total, done) tiles over every key."""
        both = list(self.reported.values()) + list(self.exact.values())
        return sum(t for t, _ in both), sum(d for _, d in both)

    def finished(self, status: str) -> None:
        self.done += status == "done"
        self.failed += status == "failed"
        self.bar.set_postfix_str(f"done {self.done}, failed {self.failed}")

    def _draw(self) -> None:
        total, done = self.counts()
        if total != self.bar.total:
            self.bar.total = total
        if done != self.bar.n:
            self.bar.update(done - self.bar.n)
        else:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
