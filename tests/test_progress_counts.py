"""The driver's tile counts of a distributed run: reported counts, exact ones on return, retries."""

from __future__ import annotations

from cdal_fast.distributed.progress import ClusterProgress, CounterReporter, TileCounter, unit_key


def test_a_total_restarts_its_key_and_counts_add_up():
    c = TileCounter()
    c.report("a", 10, 0)
    c.report("a", None, 3)
    c.report("a", None, 4)
    c.report("b", None, 2)  # counts before any total: total 0
    assert c.snapshot() == {"a": (10, 7), "b": (0, 2)}
    c.report("a", 10, 1)  # the input is retried on another worker: it restarts from zero
    assert c.snapshot()["a"] == (10, 1)


def test_reporter_throttles_and_restarts():
    sent = []
    r = CounterReporter(lambda *m: sent.append(m), "k", interval=3600.0)
    r.set_total(12)
    r.update(2)
    r.update(2)  # within the interval: held back, the driver settles the exact count on return
    assert sent == [("k", 12, 0)]
    r = CounterReporter(lambda *m: sent.append(m), "k", interval=0.0)
    r.update(2)
    r.update(3)
    assert sent[-2:] == [("k", None, 2), ("k", None, 3)]


def test_settled_counts_replace_reported_ones_and_late_reports_are_ignored():
    p = ClusterProgress(2, enabled=False)
    p.expect("slide", 12)  # a banded slide: the driver knows its total
    p.observe({unit_key("slide", 0): (0, 3), "other": (8, 5)})
    assert p.counts() == (20, 8)
    p.settle(unit_key("slide", 0), 0, 4)  # the unit returned 4 tiles; one was still in flight
    p.settle("other", 8, 8)
    p.observe({unit_key("slide", 0): (0, 3), "other": (8, 6)})  # a stale snapshot changes nothing
    assert p.counts() == (20, 12)
    p.finished("done")
    p.finished("failed")
    assert (p.done, p.failed) == (1, 1)
    p.close()
