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

Stains (``--stain h-e`` / ``h-dab``): each band's RGB rows are read from the slide at the working
scale (:class:`cdal_fast.wsi.slide_stains.WorkingRows`, the same columns as the maps) and fed with
the maps, so every nucleus carries its optical densities (nucleus, a ``--cell-ring`` um ring, the
cell) in the default Ruifrok-Johnston vectors or the slide's own estimate; with H-DAB, its IHC class.
The QC heatmaps (:class:`cdal_fast.wsi.qc.QcMaps`) are accumulated from the same bands.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..network.config import ModelConfig
from ..nuclei.params import NucleiParams
from ..nuclei.stain import PositivityRule, StainProfile, default_profile
from ..sampling.decode import STD_TO_UNIT, U8_MAX
from .mapfile import MapFile
from .qc import QcMaps
from .slide_stains import WorkingRows
from .tiling import COVERAGE_BLOCK, Coverage

__all__ = ["NucleiResult", "nuclei_enabled", "nuclei_params", "extract_nuclei", "tissue_area_um2",
           "covered_columns", "CROP_MARGIN", "stain_setup", "add_uncertainty"]

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


def stain_setup(slide: Any, opts: Any) -> tuple[StainProfile | None, PositivityRule | None]:
    """The stain profile the nuclei are measured with (None: ``--stain none``) and, for H-DAB, the
    positivity rule. ``--stain-vectors estimate`` uses the slide's own estimate (stage 1), when there
    is one of the same stains; otherwise (estimation failed, with a warning) the default vectors."""
    if opts.stain == "none":
        return None, None
    estimate = getattr(slide, "stain_estimate", None)
    if opts.stain_vectors == "estimate" and estimate is not None and estimate.kind == opts.stain:
        profile = estimate
    else:
        profile = default_profile(opts.stain)
    rule = PositivityRule(tuple(opts.positivity_thresholds), opts.positivity_compartment) \
        if opts.stain == "h-dab" else None
    return profile, rule


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
                   band_rows: int | None = None, coverage: Coverage | None = None,
                   qc: QcMaps | None = None) -> NucleiResult:
    """Label the slide's stitched maps band by band and stream the nuclei to their files.

    ``slide`` is the pipeline's ``SlidePlan``; ``band_rows`` defaults to one tile height (the
    result does not depend on it). Files are written only for the outputs ``opts`` asks for.
    ``coverage`` (default ``slide.coverage()``: the sampled tiles) limits the labelling to the
    columns the tiles reach, plus a background margin, and skips uncovered bands; the nuclei are the
    same as from the whole width, since outside the coverage the maps are background. ``qc``
    accumulates the QC heatmaps from the same bands.
    """
    from ..nuclei.bands import BandLabeller
    from ..nuclei.measure import Grid
    from ..nuclei.writers import NucleiWriters

    t0 = time.perf_counter()
    plan = slide.plan
    params = nuclei_params(opts)
    profile, rule = stain_setup(slide, opts)
    labels_path = slide.work_dir / "labels.npy" if opts.save_labels else None
    labels_map = None
    if labels_path is not None:
        labels_map = np.lib.format.open_memmap(labels_path, mode="w+", dtype=LABELS_DTYPE,
                                               shape=(plan.work_h, plan.work_w))
    coverage = slide.coverage() if coverage is None else coverage
    c0, c1 = covered_columns(coverage)
    c1 = max(c1, c0 + 1)  # a labeller needs one column even when nothing was sampled
    scale = plan.work_to_level0
    labeller = BandLabeller(params, c1 - c0, Grid(plan.work_mpp, scale, x0=c0 * scale), plan.work_h,
                            labels_out=labels_map[:, c0:c1] if labels_map is not None else None,
                            stain=profile, ring_um=opts.cell_ring_um)
    writers = NucleiWriters(slide.out_dir, slide.stem, geojson=opts.nuclei_geojson, csv_table=opts.nuclei_csv,
                            gzip_geojson=opts.nuclei_gzip, stain=profile, positivity=rule,
                            parquet=opts.nuclei_parquet)
    rgb_rows = WorkingRows(slide.path, plan.level, plan.level_scale) if profile is not None else None
    try:
        with writers:
            for nuclei in _labelled_bands(labeller, MapFile.open(prob_path), MapFile.open(std_path), coverage,
                                          (c0, c1), max(1, int(band_rows or slide.grid.tile)), rgb_rows, qc):
                writers.write(_counted(nuclei, qc, scale))
    finally:
        if rgb_rows is not None:
            rgb_rows.close()
    if labels_map is not None:
        labels_map.flush()
    area = tissue_area_um2(slide)
    summary = writers.summary(area) | {
        "nuclei": {"params": params.to_dict(), "tissue_area_um2": area, "components_cut": labeller.cut,
                   "cell_ring_um": opts.cell_ring_um if profile is not None else None,
                   "files": [str(p) for p in writers.paths], "seconds": time.perf_counter() - t0},
    }
    return NucleiResult(summary, labels_path)


def _labelled_bands(labeller: Any, prob_map: MapFile, std_map: MapFile, coverage: Coverage, cols: tuple[int, int],
                    rows: int, rgb_rows: WorkingRows | None, qc: QcMaps | None) -> Iterator[list]:
    """Feed the maps (and RGB) band by band; yield the nuclei each band finishes, then the rest."""
    c0, c1 = cols
    std_scale = 1.0 / (U8_MAX * STD_TO_UNIT)
    height = labeller.height
    for y in range(0, height, rows):
        n = min(rows, height - y)
        if not labeller.holding and not coverage.any(y, y + n):
            # no sampled tile reached these rows: nothing to label; the labeller keeps its last few rows as
            # context, whose slide pixels a ring may need when sampled rows follow
            keep = min(n, labeller.context_rows)
            tail = None
            if rgb_rows is not None:
                tail = (rgb_rows.read(y + n - keep, keep, c0, c1) if coverage.any(y + n, y + n + rows)
                        else np.full((keep, c1 - c0, 3), 255, np.uint8))  # dropped at the next skip anyway
            labeller.skip_background(n, rgb_tail=tail)
            continue
        prob = np.asarray(prob_map[y:y + n][:, c0:c1], np.float32) / U8_MAX
        std = np.asarray(std_map[y:y + n][:, c0:c1], np.float32) * std_scale
        if qc is not None:
            qc.add_band(y, std, c0, coverage)
        rgb = rgb_rows.read(y, n, c0, c1) if rgb_rows is not None else None
        yield labeller.feed(prob, std, y, rgb=rgb)
    yield labeller.finish()


def _counted(nuclei: list, qc: QcMaps | None, scale: float) -> list:
    """``nuclei``, each centroid counted in the density heatmap (working px from level-0 px)."""
    if qc is not None:
        for nucleus in nuclei:
            qc.add_nucleus(nucleus.centroid_x_px / scale, nucleus.centroid_y_px / scale)
    return nuclei


def add_uncertainty(qc: QcMaps, std_path: Path, coverage: Coverage, rows: int) -> None:
    """The uncertainty heatmap alone (no nuclei labelled): the std map's sampled bands, read once."""
    std_map = MapFile.open(std_path)
    c0, c1 = covered_columns(coverage)
    std_scale = 1.0 / (U8_MAX * STD_TO_UNIT)
    for y in range(0, coverage.height, rows):
        n = min(rows, coverage.height - y)
        if c1 > c0 and coverage.any(y, y + n):
            qc.add_band(y, np.asarray(std_map[y:y + n][:, c0:c1], np.float32) * std_scale, c0, coverage)
