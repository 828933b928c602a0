"""Throughput per slide area: ``cdal-fast segment`` against the original implementation, same run, same area.

    python bench/slide_throughput.py --data ../shared/data/monuseg --original-repo /path/to/Hejrati/cDAL
    python bench/slide_throughput.py --data ... --segment-variant fast="--model monuseg_fast" --original-patches 4

What a lab pays for is slide area. The slide is a 2000 x 2000-px mosaic at 0.25 um/px (0.25 mm^2)
of four MoNuSeg *validation* tiles (40x, 1000 x 1000 each), repeated ``--repeat`` K x K times, written
as a pyramidal OME-TIFF, with the ground-truth mask mosaicked alongside. A small slide is mostly
edge, where every tiling pays for partial tiles; K = 2 (1 mm^2) is closer to a slide's interior. Rows:

* ``original code``: the authors' own implementation, imported from a checkout given by
  ``--original-repo`` (never vendored: its licence is non-commercial), on its CPU code path (its
  FIR op falls back to plain PyTorch there; the CUDA extension it compiles at import is skipped),
  with its MoNuSeg architecture (``parameters_monu.json``; the released weights are not needed for
  timing), by its protocol: each tile resized to 512 and cut into four 256 patches (16 for the
  mosaic), each vote sampled alone at batch 1 with the full generator (condition encoder included)
  in every one of the T steps;
* ``re-implemented protocol``: the same protocol on the shipped model with cdal-fast's modules
  (``bench/authors_protocol.py``);
* ``segment``: the command line with default settings (and each ``--segment-variant``) on the
  slide, in a subprocess, as a user runs it; its seconds are the run's sampling time (the slide
  JSON's ``sampler_seconds``) and its whole wall time; Dice of the mask against the ground truth.

Per row: seconds for the slide, seconds per mm^2 (the slide is 0.25 mm^2; the model works at
0.5 um/px), and the ratio to the original code per area. ``--original-patches K`` times K of the 16
patches and scales to the area (the row says so). JSON + Markdown under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import tifffile
import torch

from cdal_fast.datasets import find_pairs, read_split, resolve_2d_root
from cdal_fast.models import load_model
from cdal_fast.sampling.imageio import read_image, read_mask, resize_image
from cdal_fast.sampling.inference import MONUSEG_WORK_SIZE
from cdal_fast.sampling.preprocess import normalise, to_chw_float
from cdal_fast.sampling.sampler import draw_noise, generators_from_seed

try:
    from bench.authors_protocol import authors_tile
    from bench.common import write_results
except ImportError:  # run as a script
    from authors_protocol import authors_tile
    from common import write_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.slides import write_ome_pyramid  # noqa: E402

SLIDE_MPP = 0.25
TILE_PX = 1000  # MoNuSeg tiles at 40x
MOSAIC = 2  # 2 x 2 tiles
PATCH = 256
COLUMNS = ["row", "seconds", "s_per_mm2", "x_vs_original_per_area", "per_unit_s", "units", "dice_vs_gt", "note"]


def mosaic(data: Path, names: list[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(RGB, ground truth) of 2 x 2 validation tiles, and the tile names used."""
    root = resolve_2d_root(data)
    pairs = find_pairs(root, names or read_split(root, "val"))[: MOSAIC * MOSAIC]
    rgb = np.zeros((MOSAIC * TILE_PX, MOSAIC * TILE_PX, 3), np.uint8)
    gt = np.zeros(rgb.shape[:2], bool)
    for i, (_, ip, mp) in enumerate(pairs):
        y, x = divmod(i, MOSAIC)
        rgb[y * TILE_PX:(y + 1) * TILE_PX, x * TILE_PX:(x + 1) * TILE_PX] = read_image(ip)[:TILE_PX, :TILE_PX, :3]
        gt[y * TILE_PX:(y + 1) * TILE_PX, x * TILE_PX:(x + 1) * TILE_PX] = read_mask(mp)[:TILE_PX, :TILE_PX]
    return rgb, gt, [p[0] for p in pairs]


def protocol_patches(rgb: np.ndarray, cfg) -> list[torch.Tensor]:
    """The original protocol's inputs: each 1000-px tile resized to 512, cut into four 256 patches, normalised."""
    out = []
    for ty in range(rgb.shape[0] // TILE_PX):  # every 1000-px tile of the (repeated) mosaic
        for tx in range(rgb.shape[1] // TILE_PX):
            tile = to_chw_float(rgb[ty * TILE_PX:(ty + 1) * TILE_PX, tx * TILE_PX:(tx + 1) * TILE_PX])
            work = normalise(resize_image(tile, MONUSEG_WORK_SIZE), cfg)
            out += [work[:, :, y:y + PATCH, x:x + PATCH] for y in (0, PATCH) for x in (0, PATCH)]
    return out


@contextlib.contextmanager
def original_code_imports(repo: Path):
    """Import the authors' modules on a CPU: their op package compiles a CUDA extension at import
    (skipped: on a CPU their ops call the native PyTorch path), and their training module imports
    data and logging modules that timing does not need (stood in by empty modules)."""
    from torch.utils import cpp_extension

    saved_load, saved_path = cpp_extension.load, list(sys.path)
    stand_ins = {name: types.ModuleType(name) for name in
                 ("metrics", "preprocess_dataset", "preprocess_dataset.dataset", "EMA", "logger")}
    stand_ins["metrics"].sampling_major_vote_func = None
    stand_ins["preprocess_dataset.dataset"].create_dataset = None
    stand_ins["EMA"].EMA = None
    cpp_extension.load = lambda *a, **k: None
    sys.path.insert(0, str(repo))
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        cpp_extension.load = saved_load
        sys.path[:] = saved_path
        for name in stand_ins:
            sys.modules.pop(name, None)


def original_code_seconds(repo: Path, patches: list[torch.Tensor], votes: int) -> float:
    """Mean seconds per patch of the authors' code and protocol (their MoNuSeg architecture)."""
    with original_code_imports(repo):
        from score_sde.models.ncsnpp_generator_adagn import NCSNpp
        from train_cDal_monu_and_lung import Posterior_Coefficients, sample_from_model

        args = argparse.Namespace(**json.loads((repo / "parameters_monu.json").read_text()))
        net = NCSNpp(args).eval()
        coeff = Posterior_Coefficients(args, torch.device("cpu"))
        torch.manual_seed(0)
        times = []
        for image in patches:
            t0 = time.perf_counter()
            for _ in range(votes):  # one vote at a time, batch 1: their evaluation loop
                sample_from_model(coeff, net, args.num_timesteps, torch.randn(1, 1, PATCH, PATCH), image, args)
            times.append(time.perf_counter() - t0)
    return float(np.mean(times))


def reimplemented_seconds(patches: list[torch.Tensor]) -> float:
    bundle = load_model()
    cfg = bundle.config
    times = []
    for i, image in enumerate(patches):
        n = draw_noise(cfg.num_steps, cfg.votes, 1, cfg.nz, PATCH, PATCH, generators_from_seed(i, 1))
        t0 = time.perf_counter()
        authors_tile(bundle.generator, image, n.x_init, n.z, n.post)
        times.append(time.perf_counter() - t0)
    return float(np.mean(times))


def run_segment(slide: Path, out: Path, gt: np.ndarray, extra: list[str]) -> dict:
    """``cdal-fast segment`` as a user runs it; the sampling seconds from its JSON, Dice against the truth."""
    t0 = time.perf_counter()
    # --no-tissue-mask: the mosaic is tissue edge to edge and the original protocol samples all of it, so
    # both sample equal areas whatever the detector decides (before GLASS_MEDIAN_MAX it dropped 10 of 25 tiles)
    cmd = [sys.executable, "-m", "cdal_fast.cli", "segment", str(slide), "--out", str(out), "-q", "--no-tissue-mask",
           *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"note": f"failed: {proc.stderr.strip().splitlines()[-1][:200]}"}
    summary = json.loads((out / f"{slide.name.split('.')[0]}.json").read_text())
    mask = tifffile.imread(out / f"{slide.name.split('.')[0]}.mask.ome.tif") > 127
    dice = 2 * (mask & gt).sum() / max(int(mask.sum() + gt.sum()), 1)
    return {"seconds": summary["sampler_seconds"], "per_unit_s": summary["sampler_seconds"] / summary["tiles_sampled"],
            "units": f"{summary['tiles_sampled']} tiles", "dice_vs_gt": float(dice),
            "note": f"wall {wall:.1f} s incl. start-up; backend {summary['model']['backend']}; {' '.join(extra)}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="MoNuSeg folder (its val split makes the mosaic)")
    ap.add_argument("--original-repo", type=Path, default=None, help="checkout of Hejrati/cDAL (not vendored)")
    ap.add_argument("--original-patches", type=int, default=16, help="patches of the original protocol timed")
    ap.add_argument("--no-reimplemented", action="store_true")
    ap.add_argument("--segment-variant", action="append", default=[], metavar="NAME=ARGS",
                    help="an extra segment row with these flags (repeatable), e.g. fast='--model monuseg_fast'")
    ap.add_argument("--repeat", type=int, default=1,
                    help="repeat the 2 x 2 mosaic K x K times (K=2: 4000 x 4000 px, 1 mm^2)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default="slide_throughput")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    rgb, gt, names = mosaic(args.data, None)
    # a bigger slide: the 2 x 2 mosaic repeated; per-area costs then reflect a slide's interior more than its edges
    rgb, gt = np.tile(rgb, (args.repeat, args.repeat, 1)), np.tile(gt, (args.repeat, args.repeat))
    area_mm2 = (rgb.shape[0] * SLIDE_MPP / 1000) * (rgb.shape[1] * SLIDE_MPP / 1000)
    cfg = load_model().config
    patches = protocol_patches(rgb, cfg)
    rows: list[dict] = []
    timed = patches[: max(1, min(args.original_patches, len(patches)))]
    if args.original_repo is not None:
        per = original_code_seconds(args.original_repo, timed, cfg.votes)
        rows.append({"row": "original code (authors' repository, their MoNuSeg architecture)",
                     "seconds": per * len(patches), "per_unit_s": per, "units": f"{len(patches)} patches",
                     "note": f"timed {len(timed)} of {len(patches)} patches; votes one by one at batch 1"})
    if not args.no_reimplemented:
        per = reimplemented_seconds(timed)
        rows.append({"row": "re-implemented protocol (shipped model, cdal-fast modules)", "seconds": per * len(patches),
                     "per_unit_s": per, "units": f"{len(patches)} patches", "note": f"timed {len(timed)} patches"})
    with tempfile.TemporaryDirectory() as tmp:
        slide = write_ome_pyramid(Path(tmp) / "mosaic.ome.tif", rgb, SLIDE_MPP, levels=3)
        variants = [("segment (defaults)", [])] + [(v.split("=", 1)[0], v.split("=", 1)[1].split())
                                                   for v in args.segment_variant]
        for i, (label, extra) in enumerate(variants):
            rows.append({"row": f"segment: {label}" if i else label, **run_segment(slide, Path(tmp) / f"o{i}", gt,
                                                                                   extra)})
    base = next((r["seconds"] for r in rows if r["row"].startswith("original code")), None)
    for r in rows:
        if "seconds" in r:
            r["s_per_mm2"] = r["seconds"] / area_mm2
            if base:
                r["x_vs_original_per_area"] = base / r["seconds"]
    note = (f"Slide: {rgb.shape[1]} x {rgb.shape[0]} px at {SLIDE_MPP} um/px ({area_mm2:.2f} mm^2), MoNuSeg val tiles "
            f"{', '.join(names)}; 1-min load average before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f}")
    write_results(args.name, rows, COLUMNS, args.out, note=note)


if __name__ == "__main__":
    main()
