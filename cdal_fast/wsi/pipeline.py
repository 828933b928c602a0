"""Segment one slide in named stages with plain data between them.

    plan_slide -> read_tiles -> sample_tiles -> stitch_tiles -> post_process -> write_outputs -> summarise

Each stage is a plain function whose inputs and outputs are dataclasses of paths, numbers, numpy
arrays and CPU tensors (all picklable), so a distributed runner can call the stages on its own
workers; :func:`segment_slide` chains them for one process. What each stage does:

1. ``plan_slide``: the slide's resolution decides the working scale (the model's um/px) and the
   pyramid level read; tissue is found on a thumbnail fine enough for the minimum tissue area, and
   only tiles touching tissue (and the region of interest, if one is given) are kept.
2. ``read_tiles``: a ``DataLoader`` with background workers reads each tile's region, resizes it
   to the model size, normalises it and draws its noise from ``(seed, tile position)``, in tile order.
3. ``sample_tiles``: the sampler runs one batch of tiles on the device.
4. ``stitch_tiles``: :class:`BandStitcher` blends tile probabilities into a band of ``tile`` rows x
   slide width and flushes finished rows to disk-backed maps in the slide's work folder, so memory
   is bounded by one tile row (plus the loader's prefetch), independent of slide height.
5. ``post_process``: work on the finished maps: outputs outside the region of interest are cleared
   to background; then, for the nucleus model, the maps are labelled band by band into nuclei,
   streamed to ``NAME.nuclei.geojson`` / ``NAME.nuclei.csv`` (:mod:`.nuclei_stage`).
6. ``write_outputs``: writers stream the maps into pyramidal OME-TIFFs (or PNGs for PNG/JPEG
   inputs) under temporary names, renamed when complete.
7. ``summarise``: the JSON summary is written last and marks the slide as done.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..atomic import atomic_output
from ..network.config import ModelConfig
from ..nuclei.stain import StainProfile, normalise_stains
from ..sampling.decode import STD_TO_UNIT, U8_MAX, MaskChannels, MaskKind, object_pixels, prob_to_u8, u8_to_mask
from ..sampling.dihedral import apply_dihedral, invert_dihedral
from ..sampling.preprocess import match_channels, normalise, to_chw_float
from ..sampling.sampler import SamplerLike, SamplerNoise, draw_image_noise, position_generator, stack_noise
from .limits import DEFAULT_MAX_PIXELS, check_work_size
from .mapfile import MapFile
from .mpp import MAX_PLAUSIBLE_MPP, MIN_PLAUSIBLE_MPP, plausible_mpp
from .nuclei_stage import LABELS_DTYPE, add_uncertainty, extract_nuclei, nuclei_enabled, tissue_area_um2
from .options import SegmentOptions
from .outputs import (
    output_paths,
    slide_stem,
    write_png,
    write_summary,
)
from .progress import NullProgress, TileProgress
from .qc import QcMaps
from .readers import SlideError, SlideReader, SmallImage, open_slide
from .roi import Roi, roi_for_slide
from .selection import clear_outside_roi, roi_planning_mask, tiles_touching
from .slide_stains import estimate_slide_stains
from .tiling import Coverage, Tile, TileGrid, VoteGrid, blend_window, merge_vote_tiles, vote_grids
from .tissue import TissueDetection, detect_tissue
from .writer import write_pyramid

__all__ = ["SegmentOptions", "SlidePlan", "TileBatch", "TileResult", "StitchedMaps", "plan_slide", "read_tiles",
           "sample_tiles", "SampleStream", "stitch_tiles", "post_process", "write_outputs", "summarise",
           "segment_slide"]

OVERLAY_SIDE = 1024  # longest side of the overlay PNG
OVERLAY_ALPHA = 0.5
OVERLAY_RGB = (0, 255, 0)
LEVEL_SLACK = 1.05  # read a pyramid level up to 5 % coarser than the working scale
PREFETCH_BATCHES = 4  # per loader worker
FLUSH_COLUMNS = 4096  # working columns per step when a finished band is encoded (bounds its float temporaries)


# -- planning ------------------------------------------------------------------------------------
@dataclass
class Plan:
    level: int
    level_scale: float  # level pixels per working pixel (>= ~1: we downsample)
    work_h: int
    work_w: int
    slide_h: int
    slide_w: int
    mpp0: float
    mpp_source: str
    work_mpp: float
    mpp_warning: str | None = None  # the resolution came from a convention (objective power)

    @property
    def work_to_level0(self) -> float:
        """Level-0 pixels per working pixel (maps, tiles and masks live on the working grid)."""
        return self.work_mpp / self.mpp0


def tile_region(tile: Tile, size: int, scale: float, level_w: int, level_h: int) -> tuple[int, int, int]:
    """(x, y, side) of the level region a working tile covers: ``size`` working px x ``scale`` level px,
    shifted back inside the level where rounding would reach past its edge (a slide smaller than a tile
    keeps (0, 0); the reader pads the rest white)."""
    side = max(1, int(round(size * scale)))
    x = min(int(round(tile.x * scale)), max(0, level_w - side))
    y = min(int(round(tile.y * scale)), max(0, level_h - side))
    return x, y, side


def make_plan(reader: SlideReader, cfg: ModelConfig, mpp_override: float | None,
              max_pixels: float = DEFAULT_MAX_PIXELS) -> Plan:
    if mpp_override is not None and not plausible_mpp(mpp_override):
        raise SlideError(f"{reader.path}: --mpp {mpp_override:g} is outside the plausible microscopy range "
                         f"{MIN_PLAUSIBLE_MPP:g}-{MAX_PLAUSIBLE_MPP:g} um/px")
    if mpp_override is None and reader.mpp_anisotropic:
        mx, my = reader.mpp_anisotropic
        raise SlideError(
            f"{reader.path}: anisotropic pixels ({mx:g} x {my:g} um/px, {reader.mpp_source}); the model needs "
            "square pixels: pass --mpp to state the resolution to use (the image is then treated as square)"
        )
    mpp0 = mpp_override or reader.mpp
    if mpp0 is None:
        raise SlideError(
            f"{reader.path}: the file has no usable resolution metadata; pass --mpp with the "
            "micrometres per pixel of its full-resolution level (e.g. --mpp 0.25 for a 40x scan)"
        )
    work_mpp = cfg.mpp or mpp0
    best = 0
    for i, lv in enumerate(reader.levels):
        if mpp0 * lv.downsample <= work_mpp * LEVEL_SLACK:
            best = i
    lv0, lv = reader.levels[0], reader.levels[best]
    work_h = max(1, round(lv0.height * mpp0 / work_mpp))
    work_w = max(1, round(lv0.width * mpp0 / work_mpp))
    check_work_size(reader.path, work_h, work_w, work_mpp, max_pixels)
    return Plan(best, work_mpp / (mpp0 * lv.downsample), work_h, work_w, lv0.height, lv0.width, mpp0,
                "--mpp" if mpp_override else reader.mpp_source, work_mpp,
                None if mpp_override else reader.mpp_warning)


def tiles_to_sample(grid: TileGrid, shifted: list[VoteGrid], mask: np.ndarray | None, downsample: float,
                    work_to_level0: float) -> list[Tile]:
    """The tiles whose footprint touches ``mask`` (every tile without one): the blended grid's, or, with
    shifted tiling, every vote grid's merged in stitching order."""
    def pick(g: TileGrid | VoteGrid) -> list[Tile]:
        return g.tiles() if mask is None else tiles_touching(mask, downsample, work_to_level0, g)

    return merge_vote_tiles(pick(g) for g in shifted) if shifted else pick(grid)


def _input_warnings(plan: Plan, tissue: TissueDetection | None, roi: Roi | None, tiles: list[Tile]) -> list[str]:
    """What the user should know about this slide's inputs (also echoed on stderr by the batch runner)."""
    warnings = [plan.mpp_warning] if plan.mpp_warning else []
    if tissue is not None and not tissue.mask.any():
        warnings.append(
            f"no tissue found (saturation threshold {'Otsu' if tissue.threshold is None else tissue.threshold}, "
            f"minimum area {tissue.min_area_um2:g} um^2, thumbnail {tissue.mpp:.3g} um/px): nothing was sampled; "
            "lower --tissue-threshold / --tissue-min-area, or pass --no-tissue-mask")
    elif roi is not None and not tiles:
        where = "covers no detected tissue" if tissue is not None else "lies outside the slide"
        warnings.append(f"the region of interest {roi.source.name} {where}: nothing was sampled")
    return warnings


def _tissue_summary(tissue: TissueDetection | None, saved: Path | None) -> dict[str, Any] | None:
    if tissue is None:
        return None
    return {"threshold": tissue.threshold, "min_area_um2": tissue.min_area_um2,
            "thumbnail_downsample": tissue.downsample, "thumbnail_mpp": tissue.mpp,
            "thumbnail_size": [int(tissue.mask.shape[1]), int(tissue.mask.shape[0])],
            "mask": str(saved) if saved is not None else None}


def _roi_summary(roi: Roi | None, plan: Plan) -> dict[str, Any] | None:
    if roi is None:
        return None
    area = roi.area_px()
    return {"source": str(roi.source), "sha256": roi.sha256, "kind": roi.kind, "features": roi.features,
            "area_px": area, "area_um2": area * plan.mpp0**2,
            "area_fraction": area / float(plan.slide_w * plan.slide_h)}


# -- tile loading (runs in worker processes) ----------------------------------------------------
class TileDataset(Dataset):
    """``stain_map`` (source, target): each tile's stains are redrawn from the slide's estimate onto
    the model's reference before it is resized and normalised (``--stain-normalise``).

    A tile of a shifted vote grid (``tile.vote`` set) is one vote: its image is put in its vote's
    frame (``vote_frames``, the sampler maps nothing back: the stitcher does) and its noise, one
    vote's, is keyed by its position and vote."""

    def __init__(self, path: Path, plan: Plan, tiles: list[Tile], tile: int, cfg: ModelConfig,
                 seed: int, steps: int, votes: int,
                 stain_map: tuple[StainProfile, StainProfile] | None = None,
                 vote_frames: tuple[int, ...] = ()) -> None:
        self.path, self.plan, self.tiles, self.tile = path, plan, tiles, tile
        self.cfg, self.seed, self.steps, self.votes = cfg, seed, steps, votes
        self.stain_map = stain_map
        self.vote_frames = vote_frames
        if vote_frames and votes != 1:
            raise ValueError(f"shifted tiling samples one vote per tile: the sampler must have votes=1, not {votes}")
        self._reader: SlideReader | None = None

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, SamplerNoise]:
        if self._reader is None:  # opened lazily: one handle per worker process
            self._reader = open_slide(self.path)
        t, p = self.tiles[i], self.tile
        lv = self._reader.levels[self.plan.level]
        x, y, size = tile_region(t, p, self.plan.level_scale, lv.width, lv.height)
        rgb = self._reader.read_region(self.plan.level, x, y, size, size)
        if self.stain_map is not None:
            rgb = normalise_stains(rgb, *self.stain_map)
        img = to_chw_float(rgb)
        if size != p:
            img = F.interpolate(img[None], size=(p, p), mode="bilinear", antialias=True, align_corners=False)[0]
        img = normalise(match_channels(img, self.cfg.img_channels), self.cfg)[0]
        key = (t.y, t.x) if t.vote is None else (t.y, t.x, t.vote)
        noise = draw_image_noise(self.steps, self.votes, self.cfg.mask_channels, self.cfg.nz, p, p,
                                 position_generator(self.seed, *key))
        if t.vote is not None:
            img = apply_dihedral(img, self.vote_frames[t.vote])
        return i, img, noise


def _worker_init(_: int) -> None:
    # Workers only read and resize: one thread each keeps them off the sampler's cores.
    torch.set_num_threads(1)


def collate(items: list[tuple[int, torch.Tensor, SamplerNoise]]) -> tuple[list[int], torch.Tensor, SamplerNoise]:
    return [it[0] for it in items], torch.stack([it[1] for it in items]), stack_noise([it[2] for it in items])


# -- stitching ---------------------------------------------------------------------------------
class BandStitcher:
    """Weighted blending of tile outputs into disk-backed maps, one tile row in memory.

    Blended tiling: each tile's vote mean and vote std are averaged with its blending window.
    Shifted tiling (``vote_frames``): each tile is one vote, mapped back from its vote's frame and
    counted on its cell only, so a pixel's mean is over its V votes and its std is the votes' own
    spread (from the sums of p and p^2)."""

    def __init__(self, grid: TileGrid, channels: int, prob_map: np.ndarray, std_map: np.ndarray,
                 kind: MaskKind | None = None, vote_frames: tuple[int, ...] = ()) -> None:
        self.grid = grid
        self.kind = kind if kind is not None else MaskChannels(channels)
        self.vote_frames = vote_frames
        p, w = grid.tile, grid.width
        ov = grid.overlap
        self.windows = {
            (t, b, l, r): torch.from_numpy(blend_window(p, ov, t, b, l, r))
            for t in (False, True) for b in (False, True) for l in (False, True) for r in (False, True)
        }
        self.acc = torch.zeros(channels, p, w)
        # blended: sum of window-weighted vote stds; shifted: per channel sum of p^2 over votes
        self.acc_std = torch.zeros(channels if vote_frames else 1, p, w)
        self.wsum = torch.zeros(p, w)
        self.band_y = 0
        self.objects = 0  # object pixels written so far
        self.prob_map, self.std_map = prob_map, std_map

    def add(self, tile: Tile, prob: torch.Tensor, std: torch.Tensor) -> None:
        """prob (C, p, p), std (C, p, p) of one tile (only the part inside the image is kept)."""
        if tile.y > self.band_y:
            self.flush(tile.y)
        if tile.vote is not None:
            self._add_vote(tile, prob)
            return
        p = self.grid.tile
        h = min(p, self.grid.height - tile.y)
        w = min(p, self.grid.width - tile.x)
        g = self.grid
        key = (tile.y > 0, tile.y + p < g.height, tile.x > 0, tile.x + p < g.width)
        wnd = self.windows[key][:h, :w]
        r0 = tile.y - self.band_y
        self.acc[:, r0:r0 + h, tile.x:tile.x + w] += prob[:, :h, :w] * wnd
        self.acc_std[0, r0:r0 + h, tile.x:tile.x + w] += std[:, :h, :w].mean(0) * wnd
        self.wsum[r0:r0 + h, tile.x:tile.x + w] += wnd

    def _add_vote(self, tile: Tile, prob: torch.Tensor) -> None:
        """One vote of a shifted grid: back to the tile's frame, then its cell's pixels counted once."""
        if tile.cell is None or not self.vote_frames:
            raise ValueError("a vote tile needs its cell and a stitcher made with the vote frames")
        prob = invert_dihedral(prob, self.vote_frames[tile.vote])
        y0, y1, x0, x1 = tile.cell
        part = prob[:, y0 - tile.y:y1 - tile.y, x0 - tile.x:x1 - tile.x]
        rows = slice(y0 - self.band_y, y1 - self.band_y)
        self.acc[:, rows, x0:x1] += part
        self.acc_std[:, rows, x0:x1] += part * part
        self.wsum[rows, x0:x1] += 1.0

    def _std(self, m: int, cols: slice, wsum: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """The finished rows' vote std: blended tile stds, or the votes' spread (mean over channels)."""
        if not self.vote_frames:
            return self.acc_std[0, :m, cols] / wsum.clamp(min=1e-12)
        var = (self.acc_std[:, :m, cols] / wsum.clamp(min=1e-12) - prob * prob).clamp(min=0.0)
        return var.sqrt().mean(0)

    def flush(self, until: int) -> None:
        """Rows [band_y, until) are final: write them and slide the band down.

        Rows beyond the band (a gap of skipped background tiles) got no contribution and stay 0
        in the zero-initialised maps.
        """
        until = min(until, self.grid.height)
        n = until - self.band_y
        if n <= 0:
            return
        m = min(n, self.wsum.shape[0])
        prob_rows = np.zeros((m, self.grid.width), dtype=np.uint8)
        std_rows = np.zeros((m, self.grid.width), dtype=np.uint8)
        reached = False
        for c0 in range(0, self.grid.width, FLUSH_COLUMNS):  # column chunks: the float temporaries stay small
            cols = slice(c0, c0 + FLUSH_COLUMNS)
            wsum = self.wsum[:m, cols]
            valid = wsum > 0
            if not valid.any():
                continue  # no tile reached these columns: background, already zero
            reached = True
            prob = torch.where(valid, self.acc[:, :m, cols] / wsum.clamp(min=1e-12), torch.zeros(()))
            std = torch.where(valid, self._std(m, cols, wsum, prob), torch.zeros(()))
            encoded = prob_to_u8(prob, self.kind)
            self.objects += object_pixels(encoded, self.kind)
            prob_rows[:, cols] = encoded.numpy()
            std_rows[:, cols] = (std * STD_TO_UNIT).clamp(0, 1).mul(U8_MAX).round().to(torch.uint8).numpy()
        if reached:  # rows are written once; the maps start as zeros (sparse files), so empty rows need no write
            self.prob_map[self.band_y:self.band_y + m] = prob_rows
            self.std_map[self.band_y:self.band_y + m] = std_rows
        for buf in (self.acc, self.acc_std, self.wsum):
            if m < buf.shape[-2]:
                buf[..., :-m, :] = buf[..., m:, :].clone()
                buf[..., -m:, :] = 0
            else:
                buf.zero_()
        self.band_y = until


def _overlay(thumb: np.ndarray, prob_map: np.ndarray, kind: MaskKind, max_side: int = OVERLAY_SIDE) -> np.ndarray:
    """Thumbnail with objects tinted green (a quick visual check, not a measurement)."""
    from PIL import Image

    h, w = thumb.shape[:2]
    k = min(1.0, max_side / max(h, w))
    size = (max(1, int(w * k)), max(1, int(h * k)))
    base = np.asarray(Image.fromarray(thumb).resize(size, Image.BILINEAR)).astype(np.float32)
    ys = np.minimum((np.arange(size[1]) + 0.5) / size[1] * prob_map.shape[0], prob_map.shape[0] - 1).astype(int)
    xs = np.minimum((np.arange(size[0]) + 0.5) / size[0] * prob_map.shape[1], prob_map.shape[1] - 1).astype(int)
    m = u8_to_mask(np.asarray(prob_map[ys][:, xs]), kind) > 0
    base[m] = base[m] * (1 - OVERLAY_ALPHA) + np.array(OVERLAY_RGB, dtype=np.float32) * OVERLAY_ALPHA
    return base.astype(np.uint8)


# -- stage 1: plan -----------------------------------------------------------------------------
@dataclass
class SlidePlan:
    """Everything the later stages need to know about one slide (stage 1's output)."""

    path: Path
    out_dir: Path
    stem: str
    small: bool  # PNG/JPEG input: PNG outputs at the input's size
    paths: dict[str, Path]
    plan: Plan
    grid: TileGrid
    tiles: list[Tile]  # the tiles to sample (tissue only, unless disabled); shifted tiling: every vote grid's
    tiles_total: int  # tiles of the whole grid (of all vote grids)
    tissue_fraction: float
    thumbnail: np.ndarray = field(repr=False)
    tissue: TissueDetection | None = field(default=None, repr=False)  # None when tissue detection is off
    roi: Roi | None = None
    warnings: list[str] = field(default_factory=list)  # also echoed on stderr by the batch runner
    stain_estimate: StainProfile | None = None  # the slide's own stains (--stain-vectors estimate, --stain-normalise)
    vote_frames: tuple[int, ...] = ()  # shifted tiling: the dihedral code of each vote's grid (tiles carry votes)

    @property
    def work_dir(self) -> Path:
        """Hidden folder of the stitched maps while the slide is in progress."""
        return self.out_dir / f".{self.stem}.work"

    def coverage(self) -> Coverage:
        """Where the stitched maps may hold anything but background: the sampled tiles' footprints."""
        return Coverage(self.plan.work_h, self.plan.work_w, self.grid.tile, self.tiles)


def plan_slide(path: Path, out_dir: Path, cfg: ModelConfig, opts: SegmentOptions) -> SlidePlan:
    """Stage 1: working scale, level, tile grid and the tiles worth sampling."""
    stem = slide_stem(path)
    with open_slide(path) as reader:
        small = isinstance(reader, SmallImage)
        plan = make_plan(reader, cfg, opts.mpp, opts.max_pixels)
        grid = TileGrid(plan.work_h, plan.work_w, cfg.image_size,
                        opts.tile_overlap if opts.tiling == "blend" else 0)
        shifted = (vote_grids(plan.work_h, plan.work_w, cfg.image_size, opts.tile_overlap, len(opts.vote_frames))
                   if opts.tiling == "shifted" else [])
        tissue: TissueDetection | None = None
        if opts.tissue and not small:
            tissue = detect_tissue(reader, plan.mpp0, opts.thumbnail_side, opts.tissue_threshold,
                                   opts.tissue_min_area_um2)
            tiles = tiles_to_sample(grid, shifted, tissue.mask, tissue.downsample, plan.work_to_level0)
            tissue_fraction, thumb = float(tissue.mask.mean()), tissue.thumb
        else:
            tiles, tissue_fraction = tiles_to_sample(grid, shifted, None, 1.0, plan.work_to_level0), 1.0
            thumb, _ = reader.thumbnail(opts.thumbnail_side)
        roi = roi_for_slide(Path(opts.roi), stem, plan.slide_w, plan.slide_h) if opts.roi else None
        if roi is not None:
            plan_mask, plan_down = roi_planning_mask(
                roi, tissue.mask if tissue else None, tissue.downsample if tissue else 1.0, plan.slide_h,
                plan.slide_w, plan.work_to_level0, grid.tile)
            tiles = tiles_to_sample(grid, shifted, plan_mask, plan_down, plan.work_to_level0)
        warnings = _input_warnings(plan, tissue, roi, tiles)
        estimate = _stain_estimate(reader, plan, grid, tiles, opts, warnings)
    paths = output_paths(out_dir, stem, small, opts.pyramid_layout)
    total = sum(g.count for g in shifted) if shifted else grid.count
    return SlidePlan(path, out_dir, stem, small, paths, plan, grid, tiles, total, tissue_fraction, thumb,
                     tissue, roi, warnings, estimate, opts.vote_frames)


def _stain_estimate(reader: SlideReader, plan: Plan, grid: TileGrid, tiles: list[Tile], opts: SegmentOptions,
                    warnings: list[str]) -> StainProfile | None:
    """The slide's Macenko estimate when an option needs it (a warning, and None, when it fails)."""
    wanted = opts.stain_normalise or (opts.stain != "none" and opts.stain_vectors == "estimate")
    if not wanted:
        return None
    lv = reader.levels[plan.level]

    def read(t: Tile) -> np.ndarray:
        x, y, side = tile_region(t, grid.tile, plan.level_scale, lv.width, lv.height)
        return reader.read_region(plan.level, x, y, side, side)

    estimate, problem = estimate_slide_stains(read, tiles, opts.stain if opts.stain != "none" else "h-e")
    if problem:
        fallback = []
        if opts.stain_normalise:
            fallback.append("tiles are sampled without stain normalisation")
        if opts.stain != "none" and opts.stain_vectors == "estimate":
            fallback.append("stains are measured with the default vectors")
        warnings.append(f"{problem}: {'; '.join(fallback)}")
    return estimate


# -- stage 2: read tiles -----------------------------------------------------------------------
@dataclass
class TileBatch:
    """Normalised tile images and their noise; ``indices`` point into ``SlidePlan.tiles``."""

    indices: list[int]
    images: torch.Tensor  # (B, C_img, p, p)
    noise: SamplerNoise


def read_tiles(slide: SlidePlan, cfg: ModelConfig, opts: SegmentOptions, steps: int, votes: int,
               pin_memory: bool = False) -> Iterator[TileBatch]:
    """Stage 2: batches of tiles in tile order, read by ``opts.workers`` background processes."""
    stain_map = None
    if opts.stain_normalise and slide.stain_estimate is not None:
        stain_map = (slide.stain_estimate, opts.stain_reference)
    ds = TileDataset(slide.path, slide.plan, slide.tiles, cfg.image_size, cfg, opts.seed, steps, votes, stain_map,
                     slide.vote_frames)
    loader = DataLoader(ds, batch_size=opts.batch_size, shuffle=False, num_workers=opts.workers,
                        collate_fn=collate, pin_memory=pin_memory, worker_init_fn=_worker_init,
                        prefetch_factor=PREFETCH_BATCHES if opts.workers > 0 else None)
    for idx, img, noise in loader:
        yield TileBatch(idx, img, noise)


# -- stage 3: sample ---------------------------------------------------------------------------
@dataclass
class TileResult:
    """Vote-mean probability and vote std of a batch (CPU float32) and the sampler's wall time."""

    indices: list[int]
    prob: torch.Tensor  # (B, C_mask, p, p)
    std: torch.Tensor
    seconds: float


@torch.inference_mode()
def sample_tiles(sampler: SamplerLike, batch: TileBatch, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> TileResult:
    """Stage 3: run the sampler on one batch on ``device`` in ``dtype``."""
    ts = time.perf_counter()
    # pinned by the loader on CUDA (SamplerNoise.pin_memory), so both copies overlap the previous batch's work
    n = batch.noise.to(device, dtype, non_blocking=True)
    prob, std = sampler(batch.images.to(device, dtype, non_blocking=True), n.x_init, n.z, n.post)
    prob, std = prob.float().cpu(), std.float().cpu()
    return TileResult(batch.indices, prob, std, time.perf_counter() - ts)


# A source of sampled tiles for one planned slide, in tile order: (slide, steps, votes) -> results.
# The default samples here; a distributed runner hands the batches to remote workers instead.
SampleStream = Callable[["SlidePlan", int, int], Iterable[TileResult]]


# -- stage 4: stitch ---------------------------------------------------------------------------
@dataclass
class StitchedMaps:
    """The slide's finished maps on disk (uint8 ``.npy``, working resolution) and what they hold."""

    prob_path: Path  # binary: round(255 * P); multi-class: labels (cdal_fast.sampling.decode.prob_to_u8)
    std_path: Path  # 255 * 2 * vote std
    object_pixels: int
    sampler_seconds: float  # summed over the stitched results
    nuclei: dict[str, Any] | None = None  # count, density, quartiles, parameters (post-process stage)
    labels_path: Path | None = None  # uint32 working-scale nucleus ids (with --save-labels)
    qc: QcMaps | None = None  # the QC heatmaps' sums (post-process stage)

    def open(self) -> tuple[MapFile, MapFile]:
        """(prob, std) with row-band reads (no memory map: see mapfile.py)."""
        return MapFile.open(self.prob_path), MapFile.open(self.std_path)


def stitch_tiles(slide: SlidePlan, results: Iterable[TileResult], cfg: ModelConfig) -> StitchedMaps:
    """Stage 4: blend results (in tile order) into disk-backed maps in ``slide.work_dir``."""
    shape = (slide.plan.work_h, slide.plan.work_w)
    prob_path, std_path = slide.work_dir / "prob.npy", slide.work_dir / "std.npy"
    prob_map, std_map = MapFile.create(prob_path, shape), MapFile.create(std_path, shape)
    stitcher = BandStitcher(slide.grid, cfg.mask_channels, prob_map, std_map, kind=cfg,
                            vote_frames=slide.vote_frames)
    seconds = 0.0
    for res in results:
        seconds += res.seconds
        for j, i in enumerate(res.indices):
            stitcher.add(slide.tiles[i], res.prob[j], res.std[j])
    stitcher.flush(slide.grid.height)
    prob_map.flush()
    std_map.flush()
    return StitchedMaps(prob_path, std_path, stitcher.objects, seconds)


# -- stage 5: post-process ---------------------------------------------------------------------
def post_process(slide: SlidePlan, maps: StitchedMaps, cfg: ModelConfig,
                 opts: SegmentOptions | None = None) -> StitchedMaps:
    """Stage 5: work on the finished maps: outside the region of interest everything is background;
    then (nucleus model, ``opts.nuclei``) nuclei are labelled and streamed to their files."""
    if slide.roi is not None:
        prob_map, std_map = maps.open()
        objects = clear_outside_roi(slide.roi, slide.plan.work_to_level0, [prob_map, std_map], cfg)
        prob_map.flush()
        std_map.flush()
        maps = replace(maps, object_pixels=objects)
    if opts is None:
        return maps
    qc = QcMaps.for_map(slide.plan.work_h, slide.plan.work_w, slide.plan.work_mpp)
    if nuclei_enabled(cfg, opts):
        found = extract_nuclei(slide, maps.prob_path, maps.std_path, opts, qc=qc)
        maps = replace(maps, nuclei=found.summary, labels_path=found.labels_path)
    else:
        add_uncertainty(qc, maps.std_path, slide.coverage(), slide.grid.tile)
    return replace(maps, qc=qc)


def _output_uuid(slide: SlidePlan, key: str, opts: SegmentOptions, cfg: ModelConfig) -> str:
    """The OME UUID of one output, a function of the job only: same job, same bytes (any runner, any rerun).
    The threshold enters as the one decoded with (``cfg``'s), whether it came from the model or the options."""
    job = {k: v for k, v in asdict(opts).items() if k not in ("overwrite", "workers", "batch_size")}
    job["threshold"] = cfg.threshold
    return str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps([slide.path.name, key, job], sort_keys=True)))


# -- stage 6: write ----------------------------------------------------------------------------
def write_outputs(slide: SlidePlan, maps: StitchedMaps, cfg: ModelConfig, opts: SegmentOptions) -> None:
    """Stage 6: mask (+ prob, uncertainty when asked) and the overlay, each renamed when complete."""
    prob_map, std_map = maps.open()
    plan, paths = slide.plan, slide.paths
    if slide.small:
        mask = u8_to_mask(np.asarray(prob_map), cfg)
        from PIL import Image

        if mask.shape != (plan.slide_h, plan.slide_w):
            mask = np.asarray(Image.fromarray(mask).resize((plan.slide_w, plan.slide_h), Image.NEAREST))
        write_png(paths["mask"], mask)
        if opts.save_prob:
            write_png(paths["prob"], np.asarray(prob_map))
        if opts.save_uncertainty:
            write_png(paths["uncertainty"], np.asarray(std_map))
    else:
        desc = json.dumps({"cdal_fast": "mask", "source": slide.path.name})
        outs: list[tuple[str, np.ndarray, Callable[[np.ndarray], np.ndarray]]] = [
            ("mask", prob_map, lambda a: u8_to_mask(a, cfg))]
        if opts.save_prob:
            outs.append(("prob", prob_map, lambda a: a))
        if opts.save_uncertainty:
            outs.append(("uncertainty", std_map, lambda a: a))
        coverage = slide.coverage()  # background tiles are neither read nor compressed again
        for key, src, fn in outs:
            with atomic_output(paths[key]) as tmp:
                write_pyramid(tmp, src, plan.slide_h, plan.slide_w, plan.mpp0, transform=fn, description=desc,
                              layout=opts.pyramid_layout, uuid=_output_uuid(slide, key, opts, cfg), coverage=coverage)
    if maps.labels_path is not None:
        labels = np.load(maps.labels_path, mmap_mode="r")
        with atomic_output(paths["labels"]) as tmp:
            write_pyramid(tmp, labels, plan.slide_h, plan.slide_w, plan.mpp0, dtype=LABELS_DTYPE,
                          description=json.dumps({"cdal_fast": "nucleus labels", "source": slide.path.name}),
                          layout=opts.pyramid_layout, uuid=_output_uuid(slide, "labels", opts, cfg),
                          coverage=slide.coverage())
    write_png(paths["overlay"], _overlay(slide.thumbnail, prob_map, cfg))
    if maps.qc is not None:
        maps.qc.write(paths["qc_density"] if maps.nuclei is not None else None, paths["qc_uncertainty"])
    if slide.tissue is not None and opts.save_tissue:
        write_png(paths["tissue"], slide.tissue.mask.astype(np.uint8) * U8_MAX)


# -- stage 7: summarise ------------------------------------------------------------------------
def summarise(slide: SlidePlan, maps: StitchedMaps, opts: SegmentOptions, steps: int, votes: int,
              seconds: float, model_info: dict | None = None) -> dict[str, Any]:
    """Stage 7: the summary, written last (its ``complete`` flag marks the slide done)."""
    plan, paths = slide.plan, slide.paths
    summary = {
        "complete": True,
        "slide": str(slide.path),
        "outputs": {k: str(v) for k, v in paths.items() if v.exists() or k == "summary"},
        "slide_size": [plan.slide_w, plan.slide_h],
        "working_size": [plan.work_w, plan.work_h],
        "mpp": plan.mpp0, "mpp_source": plan.mpp_source, "working_mpp": plan.work_mpp,
        "level_read": plan.level,
        "tiles_total": slide.tiles_total, "tiles_sampled": len(slide.tiles),
        "tissue_fraction": slide.tissue_fraction,
        "tissue": _tissue_summary(slide.tissue, paths["tissue"] if opts.save_tissue else None),
        "roi": _roi_summary(slide.roi, plan),
        "warnings": slide.warnings,
        "object_fraction": maps.object_pixels / float(plan.work_h * plan.work_w),
        "tissue_area_um2": tissue_area_um2(slide),
        **(maps.nuclei or {}),
        "stain_estimate": slide.stain_estimate.to_dict() if slide.stain_estimate is not None else None,
        "qc": maps.qc.written if maps.qc is not None else None,
        "seconds": seconds, "sampler_seconds": maps.sampler_seconds,
        "tiles_per_second": len(slide.tiles) / seconds if seconds > 0 else 0.0,
        "steps": steps, "votes": votes, "seed": opts.seed, "tile_overlap": opts.tile_overlap, "tiling": opts.tiling,
        "options": asdict(opts), "model": model_info or {},
    }
    write_summary(paths["summary"], summary)
    return summary


# -- the job -------------------------------------------------------------------------------------
@contextmanager
def work_folder(slide: SlidePlan) -> Iterator[Path]:
    """A fresh ``slide.work_dir`` (leftovers of an interrupted run removed), deleted afterwards."""
    work = slide.work_dir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def segment_slide(path: Path, out_dir: Path, sampler: SamplerLike, cfg: ModelConfig, opts: SegmentOptions,
                  device: torch.device, dtype: torch.dtype = torch.float32, model_info: dict | None = None,
                  progress: TileProgress | None = None, sample_stream: SampleStream | None = None) -> dict[str, Any]:
    """Segment ``path`` into ``out_dir`` by chaining the seven stages; returns the summary (also JSON).

    ``cfg`` decodes probabilities as it says (its threshold): the job layer put the run's threshold in
    it once (:meth:`cdal_fast.job.SegmentJob.decoding_config`).

    ``sample_stream`` replaces stages 2-3 (e.g. tiles sampled by Ray actors); results must come in tile order.
    """
    t0 = time.perf_counter()
    progress = progress or NullProgress()
    steps, votes = int(sampler.num_steps), int(sampler.votes)
    slide = plan_slide(path, out_dir, cfg, opts)
    progress.set_total(len(slide.tiles))

    def sampled() -> Iterator[TileResult]:
        if sample_stream is not None:
            results: Iterable[TileResult] = sample_stream(slide, steps, votes)
        else:
            results = (sample_tiles(sampler, batch, device, dtype)
                       for batch in read_tiles(slide, cfg, opts, steps, votes, pin_memory=device.type == "cuda"))
        for result in results:
            progress.update(len(result.indices))
            yield result

    with work_folder(slide):
        maps = post_process(slide, stitch_tiles(slide, sampled(), cfg), cfg, opts)
        write_outputs(slide, maps, cfg, opts)
        # shifted tiling: the sampler gives one vote per tile and every pixel gets one from each vote grid
        return summarise(slide, maps, opts, steps, len(opts.vote_frames) or votes, time.perf_counter() - t0,
                         model_info)
