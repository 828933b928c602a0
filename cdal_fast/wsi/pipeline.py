"""Segment one slide: read -> tile -> batch -> sample -> stitch -> write.

Data flow and memory
--------------------
1. The slide's resolution decides the working scale (the model's um/px) and the pyramid level read.
2. Tissue is found on a thumbnail fine enough for the minimum tissue area; only tiles touching tissue
   (and the region of interest, if one is given) are sampled, and outputs outside the ROI are cleared.
3. A ``DataLoader`` with background workers reads each tile's region, resizes it to the model size,
   normalises it and draws its noise from ``(seed, tile position)``, in tile order.
4. The sampler runs batches of tiles on the device.
5. :class:`BandStitcher` blends tile probabilities into a band of ``tile`` rows x slide width and
   flushes finished rows to disk-backed maps, so memory is bounded by one tile row (plus the
   loader's prefetch), independent of slide height.
6. Writers stream the maps into pyramidal OME-TIFFs (or PNGs for PNG/JPEG inputs) under temporary
   names, renamed when complete; the JSON summary is written last and marks the slide as done.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..atomic import atomic_output
from ..config import ModelConfig
from ..preprocess import match_channels, normalise, to_chw_float
from ..sampler import SamplerNoise, draw_image_noise, position_generator, stack_noise
from .readers import SMALL_SUFFIXES, SlideError, SlideReader, SmallImage, open_slide
from .roi import Roi, roi_for_slide
from .selection import clear_outside_roi, roi_planning_mask, tiles_touching
from .tiling import Tile, TileGrid, blend_window
from .tissue import DEFAULT_MIN_AREA_UM2, TissueDetection, detect_tissue
from .writer import write_pyramid

__all__ = ["SegmentOptions", "segment_slide", "output_paths", "is_complete", "slide_stem", "is_small_image",
           "write_png", "write_summary", "summary_complete"]


@dataclass
class SegmentOptions:
    batch_size: int = 8
    steps: int | None = None
    votes: int | None = None
    seed: int = 0
    tile_overlap: int = 64  # model pixels; the CLI defaults to a quarter of the tile
    workers: int = 2
    mpp: float | None = None  # override of the slide's level-0 resolution
    tissue: bool = True
    save_prob: bool = False
    save_uncertainty: bool = False
    overwrite: bool = False
    thumbnail_side: int = 2048
    tissue_threshold: float | None = None  # saturation 0-255; None = Otsu
    tissue_min_area_um2: float = DEFAULT_MIN_AREA_UM2
    save_tissue: bool = False  # write NAME.tissue.png (the mask used, at thumbnail scale)
    roi: str | None = None  # GeoJSON / mask image / folder of NAME.geojson (see roi.py)
    pyramid_layout: str = "ome"  # "ome" (SubIFDs) or "openslide" (top-level IFDs); see writer.py


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


def make_plan(reader: SlideReader, cfg: ModelConfig, mpp_override: float | None) -> Plan:
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
        if mpp0 * lv.downsample <= work_mpp * 1.05:
            best = i
    lv0, lv = reader.levels[0], reader.levels[best]
    work_h = max(1, round(lv0.height * mpp0 / work_mpp))
    work_w = max(1, round(lv0.width * mpp0 / work_mpp))
    return Plan(best, work_mpp / (mpp0 * lv.downsample), work_h, work_w, lv0.height, lv0.width, mpp0,
                "--mpp" if mpp_override else reader.mpp_source, work_mpp,
                None if mpp_override else reader.mpp_warning)


def tissue_tiles(reader: SlideReader, plan: Plan, grid: TileGrid, side: int, threshold: float | None = None,
                 min_area_um2: float = DEFAULT_MIN_AREA_UM2) -> tuple[list[Tile], TissueDetection]:
    """Tiles whose footprint touches tissue, and the detection (mask, thumbnail, scale)."""
    det = detect_tissue(reader, plan.mpp0, side, threshold, min_area_um2)
    return tiles_touching(det.mask, det.downsample, plan.work_mpp / plan.mpp0, grid), det


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
    return {"source": str(roi.source), "kind": roi.kind, "features": roi.features, "area_px": area,
            "area_um2": area * plan.mpp0**2, "area_fraction": area / float(plan.slide_w * plan.slide_h)}


# -- tile loading (runs in worker processes) ----------------------------------------------------
class TileDataset(Dataset):
    def __init__(self, path: Path, plan: Plan, tiles: list[Tile], tile: int, cfg: ModelConfig,
                 seed: int, steps: int, votes: int) -> None:
        self.path, self.plan, self.tiles, self.tile = path, plan, tiles, tile
        self.cfg, self.seed, self.steps, self.votes = cfg, seed, steps, votes
        self._reader: SlideReader | None = None

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, SamplerNoise]:
        if self._reader is None:  # opened lazily: one handle per worker process
            self._reader = open_slide(self.path)
        t, p, s = self.tiles[i], self.tile, self.plan.level_scale
        x, y = int(round(t.x * s)), int(round(t.y * s))
        size = max(1, int(round(p * s)))
        rgb = self._reader.read_region(self.plan.level, x, y, size, size)
        img = to_chw_float(rgb)
        if size != p:
            img = F.interpolate(img[None], size=(p, p), mode="bilinear", antialias=True, align_corners=False)[0]
        img = normalise(match_channels(img, self.cfg.img_channels), self.cfg)[0]
        noise = draw_image_noise(self.steps, self.votes, self.cfg.mask_channels, self.cfg.nz, p, p,
                                 position_generator(self.seed, t.y, t.x))
        return i, img, noise


def _worker_init(_: int) -> None:
    # Workers only read and resize: one thread each keeps them off the sampler's cores.
    torch.set_num_threads(1)


def collate(items: list[tuple[int, torch.Tensor, SamplerNoise]]) -> tuple[list[int], torch.Tensor, SamplerNoise]:
    return [it[0] for it in items], torch.stack([it[1] for it in items]), stack_noise([it[2] for it in items])


# -- stitching ---------------------------------------------------------------------------------
class BandStitcher:
    """Weighted blending of tile outputs into disk-backed maps, one tile row in memory."""

    def __init__(self, grid: TileGrid, channels: int, prob_map: np.ndarray, std_map: np.ndarray) -> None:
        self.grid = grid
        p, w = grid.tile, grid.width
        ov = grid.overlap
        self.windows = {
            (t, b, l, r): torch.from_numpy(blend_window(p, ov, t, b, l, r))
            for t in (False, True) for b in (False, True) for l in (False, True) for r in (False, True)
        }
        self.acc = torch.zeros(channels, p, w)
        self.acc_std = torch.zeros(p, w)
        self.wsum = torch.zeros(p, w)
        self.band_y = 0
        self.objects = 0  # object pixels written so far
        self.prob_map, self.std_map = prob_map, std_map

    def add(self, tile: Tile, prob: torch.Tensor, std: torch.Tensor) -> None:
        """prob (C, p, p), std (C, p, p) of one tile (only the part inside the image is kept)."""
        if tile.y > self.band_y:
            self.flush(tile.y)
        p = self.grid.tile
        h = min(p, self.grid.height - tile.y)
        w = min(p, self.grid.width - tile.x)
        g = self.grid
        key = (tile.y > 0, tile.y + p < g.height, tile.x > 0, tile.x + p < g.width)
        wnd = self.windows[key][:h, :w]
        r0 = tile.y - self.band_y
        self.acc[:, r0:r0 + h, tile.x:tile.x + w] += prob[:, :h, :w] * wnd
        self.acc_std[r0:r0 + h, tile.x:tile.x + w] += std[:, :h, :w].mean(0) * wnd
        self.wsum[r0:r0 + h, tile.x:tile.x + w] += wnd

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
        wsum = self.wsum[:m]
        valid = wsum > 0
        prob = torch.where(valid, self.acc[:, :m] / wsum.clamp(min=1e-12), torch.zeros(()))
        std = torch.where(valid, self.acc_std[:m] / wsum.clamp(min=1e-12), torch.zeros(()))
        encoded = _encode_prob(prob)
        self.objects += int((encoded >= 128).sum()) if prob.shape[0] == 1 else int((encoded > 0).sum())
        self.prob_map[self.band_y:self.band_y + m] = encoded.numpy()
        self.std_map[self.band_y:self.band_y + m] = (std * 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
        for buf in (self.acc, self.acc_std, self.wsum):
            if m < buf.shape[-2]:
                buf[..., :-m, :] = buf[..., m:, :].clone()
                buf[..., -m:, :] = 0
            else:
                buf.zero_()
        self.band_y = until


def _encode_prob(prob: torch.Tensor) -> torch.Tensor:
    """Binary: P(object) as uint8 0-255. Multi-class: class label map (argmax) as uint8."""
    if prob.shape[0] == 1:
        return prob[0].clamp(0, 1).mul(255).round().to(torch.uint8)
    return prob.argmax(0).to(torch.uint8)


# -- outputs -------------------------------------------------------------------------------------
def slide_stem(path: Path) -> str:
    """Output name stem: ``a.ome.tif`` -> ``a``, ``b.svs`` -> ``b``."""
    return path.name.split(".")[0] if path.name.lower().endswith((".ome.tif", ".ome.tiff")) else path.stem


def is_small_image(path: Path) -> bool:
    return path.name.lower().endswith(SMALL_SUFFIXES)


def output_paths(out_dir: Path, stem: str, small: bool, layout: str = "ome") -> dict[str, Path]:
    """``layout`` "openslide" writes plain pyramidal TIFFs (``.tif``): they carry no OME metadata."""
    ext = ".png" if small else (".ome.tif" if layout == "ome" else ".tif")
    return {
        "mask": out_dir / f"{stem}.mask{ext}",
        "prob": out_dir / f"{stem}.prob{ext}",
        "uncertainty": out_dir / f"{stem}.uncertainty{ext}",
        "overlay": out_dir / f"{stem}.overlay.png",
        "tissue": out_dir / f"{stem}.tissue.png",
        "summary": out_dir / f"{stem}.json",
    }


def is_complete(out_dir: Path, stem: str, small: bool, layout: str = "ome") -> bool:
    paths = output_paths(out_dir, stem, small, layout)
    return paths["mask"].is_file() and summary_complete(paths["summary"])


def _mask_from_prob(a: np.ndarray, multiclass: bool) -> np.ndarray:
    return a if multiclass else np.where(a >= 128, 255, 0).astype(np.uint8)


def write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    with atomic_output(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Written last: its ``complete`` flag is what marks an input as done."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")


def summary_complete(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def _overlay(thumb: np.ndarray, prob_map: np.ndarray, multiclass: bool, max_side: int = 1024) -> np.ndarray:
    """Thumbnail with objects tinted green (a quick visual check, not a measurement)."""
    from PIL import Image

    h, w = thumb.shape[:2]
    k = min(1.0, max_side / max(h, w))
    size = (max(1, int(w * k)), max(1, int(h * k)))
    base = np.asarray(Image.fromarray(thumb).resize(size, Image.BILINEAR)).astype(np.float32)
    ys = np.minimum((np.arange(size[1]) + 0.5) / size[1] * prob_map.shape[0], prob_map.shape[0] - 1).astype(int)
    xs = np.minimum((np.arange(size[0]) + 0.5) / size[0] * prob_map.shape[1], prob_map.shape[1] - 1).astype(int)
    m = _mask_from_prob(np.asarray(prob_map[ys][:, xs]), multiclass) > 0
    base[m] = base[m] * 0.5 + np.array([0, 255, 0], dtype=np.float32) * 0.5
    return base.astype(np.uint8)


# -- the job -------------------------------------------------------------------------------------
def segment_slide(path: Path, out_dir: Path, sampler: torch.nn.Module, cfg: ModelConfig, opts: SegmentOptions,
                  device: torch.device, dtype: torch.dtype = torch.float32, model_info: dict | None = None,
                  progress: Any = None) -> dict[str, Any]:
    """Segment ``path`` into ``out_dir``; returns the summary (also written as JSON)."""
    t0 = time.perf_counter()
    stem = slide_stem(path)
    with open_slide(path) as reader:
        small = isinstance(reader, SmallImage)
        paths = output_paths(out_dir, stem, small, opts.pyramid_layout)
        plan = make_plan(reader, cfg, opts.mpp)
        grid = TileGrid(plan.work_h, plan.work_w, cfg.image_size, opts.tile_overlap)
        all_tiles = grid.tiles()
        tissue: TissueDetection | None = None
        if opts.tissue and not small:
            tiles, tissue = tissue_tiles(reader, plan, grid, opts.thumbnail_side, opts.tissue_threshold,
                                         opts.tissue_min_area_um2)
            tissue_fraction, thumb = float(tissue.mask.mean()), tissue.thumb
        else:
            tiles, tissue_fraction = all_tiles, 1.0
            thumb, _ = reader.thumbnail(opts.thumbnail_side)
        roi = roi_for_slide(Path(opts.roi), stem, plan.slide_w, plan.slide_h) if opts.roi else None
        if roi is not None:
            plan_mask, plan_down = roi_planning_mask(
                roi, tissue.mask if tissue else None, tissue.downsample if tissue else 1.0, plan.slide_h,
                plan.slide_w, plan.work_mpp / plan.mpp0, grid.tile)
            tiles = tiles_touching(plan_mask, plan_down, plan.work_mpp / plan.mpp0, grid)
        warnings = _input_warnings(plan, tissue, roi, tiles)

    work = out_dir / f".{stem}.work"
    if work.exists():
        shutil.rmtree(work)  # leftovers of an interrupted run
    work.mkdir(parents=True)
    try:
        prob_map = np.lib.format.open_memmap(work / "prob.npy", mode="w+", dtype=np.uint8,
                                             shape=(plan.work_h, plan.work_w))
        std_map = np.lib.format.open_memmap(work / "std.npy", mode="w+", dtype=np.uint8,
                                            shape=(plan.work_h, plan.work_w))
        stitcher = BandStitcher(grid, cfg.mask_channels, prob_map, std_map)
        steps = int(sampler.num_steps)
        votes = int(sampler.votes)
        ds = TileDataset(path, plan, tiles, cfg.image_size, cfg, opts.seed, steps, votes)
        loader = DataLoader(ds, batch_size=opts.batch_size, shuffle=False, num_workers=opts.workers,
                            collate_fn=collate, pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
                            prefetch_factor=4 if opts.workers > 0 else None)
        t_sample = 0.0
        with torch.inference_mode():
            for idx, img, noise in loader:
                ts = time.perf_counter()
                n = noise.to(device, dtype)
                prob, std = sampler(img.to(device, dtype, non_blocking=True), n.x_init, n.z, n.post)
                prob, std = prob.float().cpu(), std.float().cpu()
                t_sample += time.perf_counter() - ts
                for j, i in enumerate(idx):
                    stitcher.add(tiles[i], prob[j], std[j])
                if progress is not None:
                    progress(len(idx))
        stitcher.flush(grid.height)
        multiclass = cfg.mask_channels > 1
        if roi is not None:  # outputs outside the region of interest are background
            stitcher.objects = clear_outside_roi(roi, plan.work_mpp / plan.mpp0, [prob_map, std_map], multiclass)
        prob_map.flush()
        std_map.flush()
        if tissue is not None and opts.save_tissue:
            write_png(paths["tissue"], tissue.mask.astype(np.uint8) * 255)
        desc = json.dumps({"cdal_fast": "mask", "source": path.name})
        if small:
            mask = _mask_from_prob(np.asarray(prob_map), multiclass)
            from PIL import Image

            if mask.shape != (plan.slide_h, plan.slide_w):
                mask = np.asarray(Image.fromarray(mask).resize((plan.slide_w, plan.slide_h), Image.NEAREST))
            write_png(paths["mask"], mask)
            if opts.save_prob:
                write_png(paths["prob"], np.asarray(prob_map))
            if opts.save_uncertainty:
                write_png(paths["uncertainty"], np.asarray(std_map))
        else:
            outs = [("mask", prob_map, lambda a: _mask_from_prob(a, multiclass))]
            if opts.save_prob:
                outs.append(("prob", prob_map, lambda a: a))
            if opts.save_uncertainty:
                outs.append(("uncertainty", std_map, lambda a: a))
            for key, src, fn in outs:
                with atomic_output(paths[key]) as tmp:
                    write_pyramid(tmp, src, plan.slide_h, plan.slide_w, plan.mpp0, transform=fn, description=desc,
                                  layout=opts.pyramid_layout)
        write_png(paths["overlay"], _overlay(thumb, prob_map, multiclass))

        seconds = time.perf_counter() - t0
        summary = {
            "complete": True,
            "slide": str(path),
            "outputs": {k: str(v) for k, v in paths.items()
                        if v.exists() or k == "summary"},
            "slide_size": [plan.slide_w, plan.slide_h],
            "working_size": [plan.work_w, plan.work_h],
            "mpp": plan.mpp0, "mpp_source": plan.mpp_source, "working_mpp": plan.work_mpp,
            "level_read": plan.level,
            "tiles_total": len(all_tiles), "tiles_sampled": len(tiles),
            "tissue_fraction": tissue_fraction,
            "tissue": _tissue_summary(tissue, paths["tissue"] if opts.save_tissue else None),
            "roi": _roi_summary(roi, plan),
            "warnings": warnings,
            "object_fraction": stitcher.objects / float(plan.work_h * plan.work_w),
            "seconds": seconds, "sampler_seconds": t_sample,
            "tiles_per_second": len(tiles) / seconds if seconds > 0 else 0.0,
            "steps": steps, "votes": votes, "seed": opts.seed, "tile_overlap": opts.tile_overlap,
            "options": asdict(opts), "model": model_info or {},
        }
        write_summary(paths["summary"], summary)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)
