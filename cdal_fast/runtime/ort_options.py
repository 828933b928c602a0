"""onnxruntime session settings for the CPU sampler graph (measured in ``bench/cpu_tile.py``).

The defaults of onnxruntime leave speed and stability on the table for this graph on a small CPU:

* denormal floats: the shipped weights were trained from near-zero initialisations (the residual
  blocks' last conv, the attention output) and stored in float16, so activations pass through
  subnormal values, which x86 cores process with a microcode assist tens of times slower than
  normal numbers. Flushing them to zero changes results only below 1.2e-38;
* threads: one intra-op thread per core of this process's CPU set (``os.sched_getaffinity``), no
  inter-op pool (the graph is a chain; a second pool only competes for the same cores), and no
  spin-waiting, so a busy machine (or a tile reader in another process) is not starved by idle
  spinning;
* the full graph optimisation level and sequential execution.

Everything here is a pure function of its arguments so that the benchmark can build the default
and the tuned session side by side.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["cpu_cores", "tuned_session_options", "default_session_options"]

FLUSH_DENORMALS = "session.set_denormal_as_zero"
ALLOW_SPINNING = "session.intra_op.allow_spinning"


def cpu_cores() -> int:
    """Cores this process may run on (the CPU set of a container or ``taskset``, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_session_options() -> Any:
    """onnxruntime's own defaults (what ``InferenceSession(path)`` uses): the benchmark's reference."""
    import onnxruntime as ort

    return ort.SessionOptions()


def tuned_session_options(threads: int | None = None) -> Any:
    """Session options for the sampler graph on a CPU: ``threads`` intra-op threads (default: the
    cores of this process), sequential, all graph optimisations, denormals flushed, no spinning."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads) if threads else cpu_cores()
    so.inter_op_num_threads = 1
    so.enable_mem_pattern = True
    so.enable_cpu_mem_arena = True
    so.add_session_config_entry(FLUSH_DENORMALS, "1")
    so.add_session_config_entry(ALLOW_SPINNING, "0")
    return so
