"""Helpers shared by the benchmarks: timing, environment description, result files."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cdal_fast.atomic import atomic_output


def describe_machine() -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def time_calls(fn: Callable[[], object], warmup: int = 1, min_time: float = 2.0, max_iters: int = 50,
               sync: bool = False) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if sync:
        torch.cuda.synchronize()
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (time.perf_counter() - start < min_time or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def write_results(name: str, rows: list[dict], columns: list[str], out_dir: Path, extra: dict | None = None,
                  quiet: bool = False, note: str | None = None) -> None:
    """Write ``name.json`` and ``name.md`` (a Markdown table, ``note`` under the machine line) under
    ``out_dir``, each renamed into place when complete; print the table unless quiet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": describe_machine(), "rows": rows, **(extra or {})}
    with atomic_output(out_dir / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    header = f"Machine: {json.dumps(payload['machine'])}\n\n" + (f"{note}\n\n" if note else "")
    with atomic_output(out_dir / f"{name}.md") as tmp:
        tmp.write_text(header + "\n".join(lines) + "\n")
    if not quiet:
        print(header + "\n".join(lines))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
