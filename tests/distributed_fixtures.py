"""Small slides, tiny weights and their single-process outputs, shared (session scope, via conftest)
by the Ray, --shard and device-list tests so the reference run is computed once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cdal_fast.job import SegmentJob
from cdal_fast.models import load_model
from cdal_fast.sampling.sampler import FixedStepSampler
from cdal_fast.wsi.batch import TaskRun, segment_all
from cdal_fast.wsi.options import SegmentOptions

from .slides import write_ome_pyramid
from .test_segment import _tiny_weights

SLIDE_PX = 176  # at 0.5 um/px and 64-px tiles with 16 px overlap: 4 x 4 = 16 tiles
COMPARED = ("mask.ome.tif", "prob.ome.tif", "uncertainty.ome.tif", "overlay.png")


def job_for(weights: Path, opts: SegmentOptions) -> SegmentJob:
    """The job a worker of these tests runs: the tiny weights, eager float32 on the CPU, ``opts``."""
    return SegmentJob.of(load_model(weights), opts, weights=str(weights))


def small_opts(**kw) -> SegmentOptions:
    """The options of the reference run (the CLI tests pass the same as flags)."""
    return SegmentOptions(batch_size=2, seed=3, tile_overlap=16, workers=0, tissue=False, save_prob=True,
                          save_uncertainty=True, **kw)


def same_bytes(a: Path, b: Path, stems: list[str]) -> None:
    for stem in stems:
        for suffix in COMPARED:
            assert (a / f"{stem}.{suffix}").read_bytes() == (b / f"{stem}.{suffix}").read_bytes(), f"{stem}.{suffix}"


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    return _tiny_weights(tmp_path_factory.mktemp("w"))


@pytest.fixture(scope="session")
def slides(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    rng = np.random.default_rng(0)
    for i in range(4):
        img = rng.integers(0, 255, (SLIDE_PX, SLIDE_PX, 3), dtype=np.uint8)
        write_ome_pyramid(folder / f"s{i}.ome.tif", img, mpp=0.5, levels=2, tile=64)
    return folder


@pytest.fixture(scope="session")
def reference(tmp_path_factory, weights, slides) -> Path:
    """The single-process run every Ray run must match byte for byte."""
    out = tmp_path_factory.mktemp("ref")
    bundle = load_model(weights)
    sampler = FixedStepSampler(bundle.generator)
    # CPU float sums depend on the intra-op thread count; every run compared with this one uses 1 thread
    # (a CPU actor's default --ray-cpus-per-actor), so the reference does too.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = TaskRun.local(SegmentJob.of(bundle, small_opts()), sampler, bundle.config, torch.device("cpu"))
        segment_all(sorted(slides.glob("s*.ome.tif")), out, run, echo=lambda m: None, show_progress=False)
    finally:
        torch.set_num_threads(before)
    return out


