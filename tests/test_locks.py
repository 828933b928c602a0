"""Issue 17 item 8: per-input locks; two real concurrent `segment` runs share one --out."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cdal_fast.wsi.locks import lock_path, read_lock, try_lock

from .test_segment import _tiny_weights

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this id now (pids are not reused this quickly)


def _write_lock(path: Path, pid: int, age: float = 0.0) -> None:
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": time.time()}))
    os.utime(path, (time.time() - age, time.time() - age))


def test_second_owner_is_refused_until_release(tmp_path):
    lock = try_lock(tmp_path, "a/x")
    assert lock is not None and lock.path == tmp_path / "a" / ".x.lock"
    assert read_lock(lock.path).pid == os.getpid()
    assert try_lock(tmp_path, "a/x") is None
    lock.release()
    assert not lock.path.exists()
    again = try_lock(tmp_path, "a/x")
    assert again is not None
    again.release()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    _write_lock(lock_path(tmp_path, "x"), _dead_pid())
    lock = try_lock(tmp_path, "x")
    assert lock is not None and read_lock(lock.path).pid == os.getpid()
    lock.release()


def test_live_lock_is_kept_and_an_old_heartbeat_is_stale(tmp_path):
    parent = os.getppid()  # alive, not us
    _write_lock(lock_path(tmp_path, "x"), parent)
    assert try_lock(tmp_path, "x") is None
    assert read_lock(lock_path(tmp_path, "x")).pid == parent  # a live owner's lock is never removed
    _write_lock(lock_path(tmp_path, "x"), parent, age=1000.0)  # hung: no heartbeat for 1000 s
    lock = try_lock(tmp_path, "x", stale_seconds=100.0)
    assert lock is not None
    lock.release()


def test_heartbeat_refreshes_the_lock(tmp_path):
    lock = try_lock(tmp_path, "x", heartbeat_seconds=0.05)
    os.utime(lock.path, (time.time() - 500, time.time() - 500))
    time.sleep(0.3)
    assert read_lock(lock.path).age_seconds < 5
    lock.release()


def test_two_concurrent_segment_runs_process_each_input_once(tmp_path):
    weights = _tiny_weights(tmp_path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(inputs / f"img{i}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cdal_fast.cli", "segment", str(inputs), "--out", str(out), "--weights",
           str(weights), "--mpp", "0.5", "--workers", "0", "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    done = [line.split()[1].rstrip(":") for _, err in logs for line in err.splitlines() if line.startswith("done")]
    assert sorted(Path(d).name for d in done) == [f"img{i}.png" for i in range(6)]  # each exactly once
    per_run = [sum(line.startswith("done") for line in err.splitlines()) for _, err in logs]
    print("inputs done per run:", per_run, "lock skips:", sum(err.count("being processed by") for _, err in logs))
    for i in range(6):
        assert json.loads((out / f"img{i}.json").read_text())["complete"]
        assert (out / f"img{i}.mask.png").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no locks, work folders, partials
