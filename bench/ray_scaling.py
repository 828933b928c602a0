"""Ray path on this machine's cores: 1 vs 2 CPU actors (tiles/s, ratio) and its overhead against the
single-process run on the same work (same slides, options and model; one torch thread per worker),
on a short job and on one of realistic size, with the fixed start-up cost apart.

    PYTHONPATH=$PWD python bench/ray_scaling.py [--sizes quick realistic] [--out bench/results]

Per size, three runs on the same slides: one process; Ray with 1 actor; Ray with 2 actors. For the
1-actor run the wall time splits into the actor's busy time (its work: the same per-input path
as the single process; also as CPU seconds, which other jobs on the machine disturb far less than
wall time) and the rest, the fixed cost of a run (actor process start and model
load, scheduling, the driver's skip checks): ``work_overhead`` = busy / single - 1 is what grows
with the job, ``fixed_s`` = wall - busy what does not. ``ray.init`` (starting the local Ray
instance) is timed once and reported apart; a cluster pays it once, not per command. The tiny
model keeps runs short, so per-tile work is small and the relative overhead an upper bound of what
a real model sees. The load average is recorded before and after each size: the numbers mean
something only when the 1-min load stays well under the core count.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import write_results
from cdal_fast.distributed.ray_runner import ACTOR_ENV, RayOptions, run_on_ray
from cdal_fast.job import SegmentJob
from cdal_fast.models import load_model
from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator
from cdal_fast.sampling.sampler import FixedStepSampler
from cdal_fast.weights import save_weights
from cdal_fast.wsi.batch import TaskRun, segment_all
from cdal_fast.wsi.options import SegmentOptions
from tests.slides import write_ome_pyramid

SLIDE_MPP = 0.5  # the tiny model's resolution: no resampling
SIZES = {"quick": (4, 300), "realistic": (4, 480)}  # slides, side in px: 144 and 400 tiles (~25 s, ~70 s)
ACTOR_COUNTS = (1, 2)


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _make_inputs(folder: Path, count: int, side: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_ome_pyramid(folder / f"b{i}.ome.tif", rng.integers(0, 255, (side, side, 3), dtype=np.uint8),
                              mpp=SLIDE_MPP, levels=2, tile=64) for i in range(count)]


def _tiny_weights(folder: Path) -> Path:
    torch.manual_seed(0)
    save_weights(folder / "tiny", Generator(get_preset("tiny")).eval(), dtype=torch.float32)
    return folder / "tiny.safetensors"


def _one_size(name: str, count: int, side: int, tmpdir: Path, weights: Path, opts: SegmentOptions) -> list[dict]:
    files = _make_inputs(tmpdir / name, count, side)
    load_before = _load()
    bundle = load_model(weights)
    t0, c0 = time.perf_counter(), time.process_time()
    job = SegmentJob.of(bundle, opts, weights=str(weights))
    run = TaskRun.local(job, FixedStepSampler(bundle.generator), bundle.config, torch.device("cpu"))
    rep = segment_all(files, tmpdir / f"{name}-single", run, echo=lambda m: None, show_progress=False)
    single, single_cpu = time.perf_counter() - t0, time.process_time() - c0
    tiles = rep.to_dict()["tiles"]
    rows = [{"size": name, "run": "single process, 1 thread", "actors": 0, "seconds": single, "tiles": tiles,
             "tiles_per_s": tiles / single, "vs_single": 1.0, "cpu_s": single_cpu}]
    spec = job
    for n in ACTOR_COUNTS:
        t0, c0 = time.perf_counter(), time.process_time()
        _rep, summary = run_on_ray(files, tmpdir / f"{name}-ray{n}", spec, RayOptions(actors=n, unit="input"),
                                   echo=lambda m: None, show_progress=False)
        wall, driver_cpu = time.perf_counter() - t0, time.process_time() - c0
        busy = sum(a["busy_seconds"] for a in summary["ray"]["per_actor"])
        cpu = sum(a["cpu_seconds"] for a in summary["ray"]["per_actor"])
        row = {"size": name, "run": f"ray, {n} CPU actor(s)", "actors": n, "seconds": wall, "tiles": tiles,
               "tiles_per_s": tiles / wall, "vs_single": single / wall, "actor_busy_s": busy, "cpu_s": cpu,
               "driver_cpu_s": driver_cpu}
        if n == 1:
            row |= {"overhead": wall / single - 1, "work_overhead": busy / single - 1, "fixed_s": wall - busy,
                    "work_overhead_cpu": cpu / single_cpu - 1}
        rows.append(row)
    load_after = _load()
    for r in rows:
        r |= {"load_1m_before": load_before[0], "load_1m_after": load_after[0]}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    import ray

    torch.set_num_threads(1)
    opts = SegmentOptions(batch_size=1, tile_overlap=16, workers=0, tissue=False)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        weights = _tiny_weights(tmpdir)
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.getcwd(), **ACTOR_ENV}})
        ray_init = time.perf_counter() - t0
        try:
            for name in args.sizes:
                rows += _one_size(name, *SIZES[name], tmpdir, weights, opts)
        finally:
            ray.shutdown()
    by = {(r["size"], r["actors"]): r for r in rows}
    extra = {"cores": os.cpu_count(), "ray_init_s": ray_init,
             "scaling_2_vs_1": {s: by[(s, 2)]["tiles_per_s"] / by[(s, 1)]["tiles_per_s"] for s in args.sizes},
             "note": "seconds of Ray runs exclude ray.init (ray_init_s, once per Ray instance) and include each run's "
                     "actor start and model load (fixed_s); work_overhead = actor busy / single - 1; cpu_s: CPU "
                     "seconds of the single process, or of the actors' processes while they worked (their Ray "
                     "threads included), work_overhead_cpu = their ratio - 1 (robust to other load); "
                     "driver_cpu_s: the driver process during the Ray run"}
    columns = ["size", "run", "actors", "seconds", "tiles", "tiles_per_s", "vs_single", "actor_busy_s", "overhead",
               "work_overhead", "fixed_s", "cpu_s", "work_overhead_cpu", "driver_cpu_s", "load_1m_before",
               "load_1m_after"]
    write_results("ray_scaling", rows, columns, args.out, extra=extra,
                  note=f"ray.init: {ray_init:.1f} s (once per Ray instance, not in the rows); {os.cpu_count()} cores")
    for s in args.sizes:
        r1 = by[(s, 1)]
        print(f"{s}: overhead 1 actor {r1['overhead']:+.1%} (work {r1['work_overhead']:+.1%}, work CPU "
              f"{r1['work_overhead_cpu']:+.1%}, fixed "
              f"{r1['fixed_s']:.1f} s), 2 vs 1 actors x{extra['scaling_2_vs_1'][s]:.2f}, load {r1['load_1m_before']}"
              f" -> {r1['load_1m_after']}")


if __name__ == "__main__":
    main()
