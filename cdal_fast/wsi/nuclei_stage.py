"""The slide pipeline's nucleus step: stitched maps -> nuclei files, summary numbers, label map.

Part of stage 5 (``post_process``), after the region-of-interest clearing, so objects outside the
ROI never exist. The stitched probability and vote-std maps (uint8 ``.npy`` memory maps at the
working scale) are read back band by band, ``grid.tile`` rows at a time, and fed to
:class:`cdal_fast.nuclei.BandLabeller`, whose buffer is the overlap margin between bands (each
nucleus emitted once, whole, wherever the tile and band borders fall). Each finished nucleus goes
straight to :class:`cdal_fast.nuclei.NucleiWriters` (streamed GeoJSON / CSV), so memory is one band
plus the labeller's buffer, whatever the slide's size. Bands that no sampled tile reached
(``SlidePlan.coverage``) are background: they are skipped unread while the labeller holds nothing,
and only the columns the sampled tiles reach (plus a background margin) are labelled, so on a
mostly-background slide the labeller's memory follows the tissue's width, not the slide's.

Coordinates: the maps have ``work_mpp`` um per pixel and the tiles were read at
``work_mpp / mpp0`` level-0 pixels per map pixel, so ``Grid(work_mpp, work_mpp / mpp0)`` puts
outlines and centroids in level-0 pixels of the slide (image pixels for PNG/TIFF tiles), and areas
and lengths come out in um from the map's own pixel size.

The stored probability is ``round(255 * P)``: the threshold is applied to ``u8 / 255`` (so 0.5
means ``u8 >= 128``; the mask applies its own threshold by the same rule,
:func:`cdal_fast.sampling.decode.u8_cutoff`), the std to ``u8 / (255 * STD_TO_UNIT)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..network.config import ModelConfig
from ..nuclei.params import NucleiParams
from ..sampling.decode import STD_TO_UNIT, U8_MAX
from .mapfile import MapFile
from .tiling import COVERAGE_BLOCK, Coverage

__all__ = ["NucleiResult", "nuclei_enabled", "nuclei_params", "extract_nuclei", "tissue_area_um2",
           "covered_columns", "CROP_MARGIN"]

LABELS_DTYPE = np.uint32  # ids of the label raster (a slide can hold millions of nuclei)
CROP_MARGIN = 2 * COVERAGE_BLOCK  # background columns kept on each side of the covered ones


@dataclass
class NucleiResult:
    """What the nucleus step produced: the summary numbers and, with --save-labels, the label map."""

    summary: dict[str, Any]
    labels_path: Path | None  # working-scale uint32 ``.npy`` in the work folder


def nuclei_enabled(cfg: ModelConfig, opts: Any) -> bool:
    """Objects exist only for a binary (nucleus) model and when not turned off."""
    return bool(opts.nuclei) and not cfg.multiclass


def nuclei_params(opts: Any) -> NucleiParams:
    """The validated post-processing parameters of ``opts`` (SegmentOptions)."""
    return NucleiParams(prob_threshold=opts.nuclei_threshold, marker_h_um=opts.nuclei_h_um,
                        min_area_um2=opts.nuclei_min_area_um2)


def tissue_area_um2(slide: Any) -> float:
    """Area the density refers to: tissue (inside the ROI, if any), else the ROI, else the whole image."""
    plan = slide.plan
    full = float(plan.slide_w) * float(plan.slide_h) * plan.mpp0 ** 2
    if slide.tissue is not None:
        mask = slide.tissue.mask
        if slide.roi is not None:
            mask = mask & slide.roi.rasterise(mask.shape[0], mask.shape[1], slide.tissue.downsample)
        return float(mask.mean()) * full
    if slide.roi is not None:
        return slide.roi.area_px() * plan.mpp0 ** 2
    return full


def covered_columns(coverage: Coverage, margin: int = CROP_MARGIN) -> tuple[int, int]:
    """The working columns [c0, c1) that hold every covered cell, widened by ``margin`` background
    columns on each side (within the map); (0, 0) when nothing is covered."""
    cols = np.flatnonzero(coverage.columns(0, coverage.height))
    if cols.size == 0:
        return 0, 0
    return (max(0, int(cols[0]) * coverage.block - margin),
            min(coverage.width, (int(cols[-1]) + 1) * coverage.block + margin))


def extract_nuclei(slide: Any, prob_path: Path, std_path: Path, opts: Any,
                   band_rows: int | None = None, coverage: Coverage | None = None) -> NucleiResult:
    """Label the slide's stitched maps band by band and stream the nuclei to their files.

    ``slide`` is the pipeline's ``SlidePlan``; ``band_rows`` defaults to one tile height (the
    result does not depend on it). Files are written only for the outputs ``opts`` asks for.
    ``coverage`` (default ``slide.coverage()``: the sampled tiles) limits the labelling to the
    columns the tiles reach, plus a background margin, and skips uncovered bands; the nuclei are the
    same as from the whole width, since outside the coverage the maps are background.
    """
    from ..nuclei.bands import BandLabeller
    from ..nuclei.measure import Grid
    from ..nuclei.writers import NucleiWriters

    t0 = time.perf_counter()
    plan = slide.plan
    params = nuclei_params(opts)
    grid = Grid(plan.work_mpp, plan.work_to_level0)
    prob_map, std_map = MapFile.open(prob_path), MapFile.open(std_path)  # row bands, not memory maps
    labels_path = slide.work_dir / "labels.npy" if opts.save_labels else None
    labels_map = None
    if labels_path is not None:
        labels_map = np.lib.format.open_memmap(labels_path, mode="w+", dtype=LABELS_DTYPE, shape=prob_map.shape)
    coverage = slide.coverage() if coverage is None else coverage
    c0, c1 = covered_columns(coverage)
    c1 = max(c1, c0 + 1)  # a labeller needs one column even when nothing was sampled
    grid = Grid(plan.work_mpp, grid.scale, x0=c0 * grid.scale)
    labeller = BandLabeller(params, c1 - c0, grid, plan.work_h,
                            labels_out=labels_map[:, c0:c1] if labels_map is not None else None)
    rows = max(1, int(band_rows or slide.grid.tile))
    std_scale = 1.0 / (U8_MAX * STD_TO_UNIT)
    writers = NucleiWriters(slide.out_dir, slide.stem, geojson=opts.nuclei_geojson, csv_table=opts.nuclei_csv,
                            gzip_geojson=opts.nuclei_gzip)
    with writers:
        for y in range(0, plan.work_h, rows):
            n = min(rows, plan.work_h - y)
            if labeller.buffer_rows == 0 and not coverage.any(y, y + n):
                labeller.skip_background(n)  # no sampled tile reached these rows: nothing to read or label
                continue
            prob = np.asarray(prob_map[y:y + rows][:, c0:c1], np.float32) / U8_MAX
            std = np.asarray(std_map[y:y + rows][:, c0:c1], np.float32) * std_scale
            writers.write(labeller.feed(prob, std, y))
        writers.write(labeller.finish())
    if labels_map is not None:
        labels_map.flush()
    area = tissue_area_um2(slide)
    summary = writers.summary(area) | {
        "nuclei": {"params": params.to_dict(), "tissue_area_um2": area, "components_cut": labeller.cut,
                   "files": [str(p) for p in writers.paths], "seconds": time.perf_counter() - t0},
    }
    return NucleiResult(summary, labels_path)
