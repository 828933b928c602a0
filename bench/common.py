"""Helpers shared by the benchmarks: timing, environment description, result files."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cdal_fast.atomic import atomic_output

# CPU features that decide which precision pays (AVX-512 BF16 / AMX for bfloat16, VNNI for int8)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of :data:`CPU_FLAGS` it has (Linux /proc/cpuinfo; else the platform's name)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return model, [f for f in CPU_FLAGS if f in flags]


def describe_machine() -> dict:
    """Where a number was measured: every table names its CPU (and flags) and GPU."""
    model, flags = cpu_model_and_flags()
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": model,
        "cpu_flags": " ".join(flags),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
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
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
