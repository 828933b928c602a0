"""Per-input locks, so concurrent or repeated runs on one output folder process each input once.

A lock is the file ``OUT/.NAME.lock`` created with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+
file systems): whoever creates it owns the input. It holds the owner's pid, host and start time as
JSON; while the owner works, a heartbeat thread touches it every :data:`HEARTBEAT_SECONDS`. A lock is
*stale*, and may be taken over, when its heartbeat is older than :data:`STALE_SECONDS` or when its
owner is a process on this host that no longer exists (killed runs leave such locks behind).

Taking over is itself serialised by a second exclusive file (``.NAME.lock.break``): only the process
that creates it may re-check staleness, remove the stale lock and create its own, so two processes
that both see a stale lock never both end up owning the input (and never remove a fresh lock).

The interface (:func:`try_lock`, :class:`InputLock`) is what the batch runner uses and what a
distributed runner or ``--shard`` jobs should use with the completion markers of ``outputs.py``:

    lock = try_lock(out_dir, name)
    if lock is None: skip (another run owns it)
    with lock: re-check completion, then work
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["HEARTBEAT_SECONDS", "STALE_SECONDS", "LockInfo", "InputLock", "lock_path", "read_lock", "is_stale",
           "try_lock", "describe_owner"]

HEARTBEAT_SECONDS = 10.0  # how often an owner refreshes its lock's modification time
STALE_SECONDS = 120.0  # a lock not refreshed for this long belongs to a dead or hung run
BREAK_STALE_SECONDS = 30.0  # a takeover guard older than this was left by a process that died mid-takeover


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock (as recorded in it) and how long ago it was refreshed."""

    pid: int
    host: str
    started: float
    age_seconds: float

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, heartbeat {self.age_seconds:.0f} s ago"


def lock_path(out_dir: Path, name: str) -> Path:
    """``OUT/.NAME.lock`` for an output name that may contain folders (``a/x`` -> ``OUT/a/.x.lock``)."""
    p = out_dir / name
    return p.with_name(f".{p.name}.lock")


def _owner_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


def read_lock(path: Path) -> LockInfo | None:
    """The lock's owner, or None if there is no lock. An unreadable or half-written lock counts as
    owned by an unknown process (pid 0) whose age is the file's age, so it goes stale normally."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    age = max(0.0, time.time() - st.st_mtime)
    try:
        rec = json.loads(path.read_text())
        return LockInfo(int(rec["pid"]), str(rec["host"]), float(rec["started"]), age)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return LockInfo(0, "?", st.st_mtime, age)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # unknown owner: only the heartbeat age can make it stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def is_stale(info: LockInfo, stale_seconds: float = STALE_SECONDS) -> bool:
    """Old heartbeat, or an owner on this host that has exited."""
    if info.age_seconds > stale_seconds:
        return True
    return info.host == socket.gethostname() and not _pid_alive(info.pid)


def _create(path: Path) -> bool:
    """Atomically create ``path`` holding our owner record; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(_owner_record()))
    return True


class InputLock:
    """An owned lock with a heartbeat thread; :meth:`release` (or leaving ``with``) removes it."""

    def __init__(self, path: Path, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_seconds,), daemon=True,
                                        name=f"lock-heartbeat {path.name}")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except OSError:
                return  # removed under us (a takeover after we hung): nothing left to refresh

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        self._thread.join()
        info = read_lock(self.path)
        if info is not None and info.pid == os.getpid() and info.host == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> InputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_lock(out_dir: Path, name: str, stale_seconds: float = STALE_SECONDS,
             heartbeat_seconds: float = HEARTBEAT_SECONDS) -> InputLock | None:
    """Own the input called ``name`` in ``out_dir``, or None if a live run owns it.

    A stale lock is taken over under the ``.lock.break`` guard (see the module docstring).
    """
    path = lock_path(out_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _create(path):
        return InputLock(path, heartbeat_seconds)
    info = read_lock(path)
    if info is not None and not is_stale(info, stale_seconds):
        return None
    guard = path.with_name(path.name + ".break")
    guard_info = read_lock(guard)
    if guard_info is not None and guard_info.age_seconds > BREAK_STALE_SECONDS:
        guard.unlink(missing_ok=True)
    if not _create(guard):
        return None  # another process is taking it over right now
    try:
        info = read_lock(path)  # re-check under the guard: it may have been replaced meanwhile
        if info is not None and not is_stale(info, stale_seconds):
            return None
        path.unlink(missing_ok=True)
        return InputLock(path, heartbeat_seconds) if _create(path) else None
    finally:
        guard.unlink(missing_ok=True)


def describe_owner(out_dir: Path, name: str) -> str:
    """Who owns ``name``'s lock, for the skip message."""
    info = read_lock(lock_path(out_dir, name))
    return info.describe() if info is not None else "another run (finished since)"
