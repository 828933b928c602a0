"""Ray path on this machine's cores: 1 vs 2 CPU actors (tiles/s, ratio) and its overhead against the
single-process run on the same work (same slides, options and model; one torch thread per worker).

    PYTHONPATH=$PWD python bench/ray_scaling.py [--slides 4] [--side 400] [--out bench/results]

The tiny model keeps the run short; per-tile work is then small, so the overhead measured here is
an upper bound of what a real model (much more compute per tile) sees. The load average is recorded
because the numbers are only meaningful on an otherwise idle machine.
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
from cdal_fast.config import get_preset
from cdal_fast.distributed.ray_runner import RayOptions, run_on_ray
from cdal_fast.distributed.worker import WorkerSpec
from cdal_fast.generator import Generator
from cdal_fast.models import load_model
from cdal_fast.sampler import FixedStepSampler
from cdal_fast.weights import save_weights
from cdal_fast.wsi.batch import segment_all
from cdal_fast.wsi.pipeline import SegmentOptions
from tests.slides import write_ome_pyramid

SLIDE_MPP = 0.5  # the tiny model's resolution: no resampling


def _make_inputs(folder: Path, count: int, side: int) -> tuple[list[Path], Path]:
    rng = np.random.default_rng(0)
    files = [write_ome_pyramid(folder / f"b{i}.ome.tif", rng.integers(0, 255, (side, side, 3), dtype=np.uint8),
                               mpp=SLIDE_MPP, levels=2, tile=64) for i in range(count)]
    torch.manual_seed(0)
    save_weights(folder / "tiny", Generator(get_preset("tiny")).eval(), dtype=torch.float32)
    return files, folder / "tiny.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--side", type=int, default=400, help="slide side in pixels (0.5 um/px)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    import ray

    torch.set_num_threads(1)
    opts = SegmentOptions(batch_size=1, tile_overlap=16, workers=0, tissue=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        files, weights = _make_inputs(tmpdir, args.slides, args.side)
        bundle = load_model(weights)
        t0 = time.perf_counter()
        rep = segment_all(files, tmpdir / "single", FixedStepSampler(bundle.generator), bundle.config, opts,
                          torch.device("cpu"), torch.float32, {}, echo=lambda m: None, show_progress=False)
        single = time.perf_counter() - t0
        tiles = rep.to_dict()["tiles"]
        rows.append({"run": "single process, 1 thread", "actors": 0, "seconds": single, "tiles": tiles,
                     "tiles_per_s": tiles / single, "vs_single": 1.0})
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
        try:
            spec = WorkerSpec(str(weights), "monuseg", None, None, "eager", "float32", "cpu", opts)
            for n in (1, 2):
                t0 = time.perf_counter()
                rep, summary = run_on_ray(files, tmpdir / f"ray{n}", spec, RayOptions(actors=n, unit="input"),
                                          echo=lambda m: None, show_progress=False)
                wall = time.perf_counter() - t0
                busy = sum(a["busy_seconds"] for a in summary["ray"]["per_actor"])
                rows.append({"run": f"ray, {n} CPU actor(s)", "actors": n, "seconds": wall, "tiles": tiles,
                             "tiles_per_s": tiles / wall, "vs_single": single / wall,
                             "actor_busy_s": busy})
        finally:
            ray.shutdown()
    r1, r2 = rows[1], rows[2]
    extra = {"load_average": os.getloadavg(), "cores": os.cpu_count(),
             "ray_overhead_1_actor": r1["seconds"] / single - 1,
             "scaling_2_vs_1": r2["tiles_per_s"] / r1["tiles_per_s"],
             "note": "wall times include Ray start-up and the model load in each actor; compare load_average "
                     "with cores to judge whether other jobs ran alongside"}
    write_results("ray_scaling", rows, ["run", "actors", "seconds", "tiles", "tiles_per_s", "vs_single",
                                        "actor_busy_s"], args.out, extra=extra)
    print(f"load average {extra['load_average']}, overhead (1 actor vs single) {extra['ray_overhead_1_actor']:+.1%}, "
          f"2 vs 1 actors x{extra['scaling_2_vs_1']:.2f}")


if __name__ == "__main__":
    main()
