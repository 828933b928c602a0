"""Bounded-memory nucleus labelling of a slide fed band by band, top to bottom.

Why it is exact: every step of :func:`~cdal_fast.nuclei.separate.label_nuclei` sees only one
8-connected foreground component and the background around it. So an object is final as soon as
its whole component lies in the labeller's buffer with at least :data:`CONTEXT_ROWS` rows of the
buffer above it, and does not touch the buffer's last row (more of it may still come).

The buffer is the "overlap margin" between bands, sized by the content instead of by a fixed
guess: after each band the labeller keeps only the rows from :data:`CONTEXT_ROWS` above the
topmost unfinished component down to the last row fed. Finished components are emitted and then
erased from the buffer (probability set to 0, i.e. background, which does not change any other
component's labels), so nothing is emitted twice and no set of emitted ids has to be kept.

Memory: the buffer is ``width x rows x 8`` bytes (probability and vote std, float32), with rows at
most the band height plus the tallest unfinished component. A component taller than
``params.max_component_um`` (a network of merged foreground, never one nucleus) is cut where the
buffer reaches that height: its part so far is emitted and counted in :attr:`BandLabeller.cut`.

Callers may pass bands that overlap rows already fed (e.g. the stitcher's own overlap): rows the
labeller has seen are skipped, so the result does not depend on the band height or overlap.

Stain measurements (``stain`` given): each band also brings the slide's RGB rows (uint8, 3 bytes
per pixel in the buffer). A nucleus's ring reaches ``ring_px`` pixels beyond it, so a component is
finished only when it stays ``ring_px`` rows clear of the last row fed, and that many rows are kept
above the topmost unfinished one: the ring, and the foreground it must avoid, are then whole
whatever the band height. Erased (emitted) nuclei are marked with probability -1, below any
threshold for labelling but still foreground for the rings of later neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from scipy import ndimage as ndi

from .measure import Grid, Nucleus, StainInput, measure_objects
from .params import NucleiParams
from .separate import EIGHT_CONNECTED, foreground, label_nuclei
from .stain import DEFAULT_RING_UM, StainProfile, ring_footprint

__all__ = ["BandLabeller", "CONTEXT_ROWS", "label_image"]

# Rows kept above the topmost unfinished component: its nearest background (distance transform)
# is at most one pixel outside it; two rows leave a margin for the rounding of the h-maxima.
CONTEXT_ROWS = 2
ERASED = -1.0  # probability of emitted nuclei's pixels in the buffer (background, yet a ring avoids it)


class BandLabeller:
    """Feed probability (and vote std) bands top to bottom; receive each nucleus once, complete.

    ``grid`` places the maps on the slide (um per map pixel, level-0 pixels per map pixel, origin).
    Ids run 1, 2, ... in emission order. ``height`` (map rows), when given, is checked by
    :meth:`finish`. ``labels_out``, when given, is a (height, width) integer array (a disk-backed
    map on slides) into which each emitted nucleus's pixels are painted with its id, so a label
    raster costs no second labelling and agrees with the outlines. ``stain`` (a profile) turns on the
    stain measurements: every band then brings its RGB rows, and each nucleus gets a ``ring_um``
    cytoplasm ring (see the module docstring).
    """

    def __init__(self, params: NucleiParams, width: int, grid: Grid, height: int | None = None,
                 labels_out: np.ndarray | None = None, stain: StainProfile | None = None,
                 ring_um: float = DEFAULT_RING_UM) -> None:
        if width < 1:
            raise ValueError(f"BandLabeller: width must be >= 1 map pixel, got {width}")
        if labels_out is not None and (labels_out.ndim != 2 or labels_out.shape[1] != width
                                       or (height is not None and labels_out.shape[0] != height)):
            raise ValueError(f"BandLabeller: labels_out must have shape ({height}, {width}), got {labels_out.shape}")
        self.labels_out = labels_out
        self.params = params
        self.width = int(width)
        self.grid = grid
        self.height = height
        self.max_rows = max(CONTEXT_ROWS + 1, math.ceil(params.max_component_um / grid.mpp))
        self.cut = 0  # components cut at the buffer cap (see module docstring)
        self.emitted = 0
        self._prob = np.zeros((0, self.width), np.float32)
        self._std = np.zeros((0, self.width), np.float32)
        if not (math.isfinite(ring_um) and ring_um >= 0):
            raise ValueError(f"BandLabeller: ring_um must be a finite number >= 0, got {ring_um!r}")
        self.stain = stain
        self._footprint = ring_footprint(ring_um / grid.mpp) if stain is not None else None
        self.reach = self._footprint.shape[0] // 2 if stain is not None else 0  # rows a ring reaches
        self.context_rows = max(CONTEXT_ROWS, self.reach)  # rows always kept above what comes next
        self._rgb = np.zeros((0, self.width, 3), np.uint8) if stain is not None else None
        self._holding = False  # unfinished components in the buffer
        self._top = 0  # map row of the buffer's first row
        self._seen = 0  # map rows fed so far
        self._finished = False

    @property
    def rows_seen(self) -> int:
        return self._seen

    @property
    def buffer_rows(self) -> int:
        """Rows held now (the memory bound's variable part)."""
        return self._prob.shape[0]

    @property
    def holding(self) -> bool:
        """Whether unfinished components are held (rows that must be followed by the real next rows)."""
        return self._holding

    def feed(self, prob: np.ndarray, std: np.ndarray | None = None, y0: int | None = None,
             rgb: np.ndarray | None = None) -> list[Nucleus]:
        """Add the band whose first row is map row ``y0`` (default: the next unseen row).

        Returns the nuclei finished by this band. Rows before ``rows_seen`` are ignored (overlap);
        a gap (``y0 > rows_seen``) is an error, since objects across it could not be resolved.
        ``rgb`` (uint8, the band's rows x width x 3) is required when stains are measured.
        """
        if self._finished:
            raise RuntimeError("BandLabeller.feed after finish()")
        y0 = self._seen if y0 is None else int(y0)
        if prob.ndim != 2 or prob.shape[1] != self.width:
            raise ValueError(f"BandLabeller.feed: band must be 2D with width {self.width}, got shape {prob.shape}")
        if std is not None and std.shape != prob.shape:
            raise ValueError(f"BandLabeller.feed: std shape {std.shape} differs from prob shape {prob.shape}")
        if y0 > self._seen:
            raise ValueError(f"BandLabeller.feed: band starts at row {y0} but only rows 0..{self._seen - 1} were "
                             f"fed; rows {self._seen}..{y0 - 1} are missing")
        if self._rgb is not None and (rgb is None or rgb.shape != (*prob.shape, 3) or rgb.dtype != np.uint8):
            raise ValueError(f"BandLabeller.feed: stains are measured, so a uint8 rgb band of shape "
                             f"{(*prob.shape, 3)} is needed, got {None if rgb is None else (rgb.shape, rgb.dtype)}")
        skip = self._seen - y0
        new_p = np.asarray(prob[skip:], np.float32)
        if new_p.shape[0] == 0:
            return []
        new_s = np.asarray(std[skip:], np.float32) if std is not None else np.full_like(new_p, np.nan)
        self._prob = np.concatenate([self._prob, new_p])
        self._std = np.concatenate([self._std, new_s])
        if self._rgb is not None:
            self._rgb = np.concatenate([self._rgb, rgb[skip:]])
        self._seen += new_p.shape[0]
        if self.height is not None and self._seen > self.height:
            raise ValueError(f"BandLabeller.feed: {self._seen} rows fed, more than the declared height {self.height}")
        return self._emit(final=False)

    def skip_background(self, rows: int, rgb_tail: np.ndarray | None = None) -> None:
        """Advance over ``rows`` map rows known to be background (e.g. no sampled tile reached them)
        without reading them: exactly what feeding those rows as zeros does. Allowed only while no
        unfinished component is held (it needs the real rows below it to be closed). The buffer then
        holds the last ``min(rows, context_rows)`` of them as background, the context the next rows'
        components are labelled (and ringed) with; with stain measurements ``rgb_tail`` gives their
        slide pixels (uint8, that many rows x width x 3)."""
        if self._finished:
            raise RuntimeError("BandLabeller.skip_background after finish()")
        if self._holding:
            raise ValueError(f"BandLabeller.skip_background: {self._prob.shape[0]} rows of unfinished components "
                             "are held; feed the next rows instead")
        if self.height is not None and self._seen + rows > self.height:
            raise ValueError(f"BandLabeller.skip_background: {self._seen + rows} rows, more than the declared "
                             f"height {self.height}")
        keep = min(int(rows), self.context_rows)
        if self._rgb is not None and (rgb_tail is None or rgb_tail.shape != (keep, self.width, 3)):
            raise ValueError(f"BandLabeller.skip_background: stains are measured, so the last {keep} skipped rows' "
                             f"uint8 rgb ({keep}, {self.width}, 3) are needed")
        self._drop(self._prob.shape[0])
        self._seen += int(rows)
        self._top = self._seen - keep
        self._prob = np.zeros((keep, self.width), np.float32)
        self._std = np.zeros((keep, self.width), np.float32)
        if self._rgb is not None:
            self._rgb = np.array(rgb_tail, np.uint8)

    def finish(self) -> list[Nucleus]:
        """Emit everything still held (the slide's last rows); call once after the last band."""
        if self.height is not None and self._seen != self.height:
            raise ValueError(f"BandLabeller.finish: {self._seen} of {self.height} rows were fed")
        out = self._emit(final=True)
        self._finished = True
        return out

    def _emit(self, final: bool) -> list[Nucleus]:
        if self._prob.shape[0] == 0:
            return []
        fg = foreground(self._prob, self.params)
        comps, _ = ndi.label(fg, structure=EIGHT_CONNECTED)
        tail = comps[-(self.reach + 1):]  # a ring reaches `reach` rows below its nucleus
        open_ids = np.array([], np.int32) if final else np.unique(tail[tail > 0])
        open_mask = np.isin(comps, open_ids)
        if not final and self._prob.shape[0] > self.max_rows and open_ids.size:
            tops = ndi.minimum(np.arange(comps.shape[0])[:, None].repeat(self.width, 1), comps, open_ids)
            too_tall = open_ids[np.asarray(tops) <= self._prob.shape[0] - self.max_rows]
            if too_tall.size:
                self.cut += int(too_tall.size)
                open_ids = np.setdiff1d(open_ids, too_tall)
                open_mask = np.isin(comps, open_ids)
        done = fg & ~open_mask
        nuclei: list[Nucleus] = []
        if done.any():
            labels = label_nuclei(np.where(done, self._prob, 0.0), self.params, self.grid.mpp)
            band_grid = Grid(self.grid.mpp, self.grid.scale, self.grid.x0,
                             self.grid.y0 + self._top * self.grid.scale)
            lut = np.zeros(int(labels.max()) + 1, np.int64)
            for n in measure_objects(labels, self._prob, self._std, band_grid, stain=self._stain_input()):
                self.emitted += 1
                lut[n.id] = self.emitted
                nuclei.append(n.with_id(self.emitted))
            if self.labels_out is not None:
                self._paint(labels, lut)
            self._prob[done] = ERASED
        self._trim(comps, open_mask)
        return nuclei

    def _stain_input(self) -> StainInput | None:
        if self._rgb is None:
            return None
        exclude = (self._prob >= self.params.prob_threshold) | (self._prob == ERASED)
        return StainInput(self._rgb, exclude, self.stain, self._footprint)

    def _paint(self, labels: np.ndarray, lut: np.ndarray) -> None:
        """Write the emitted ids into ``labels_out`` at the buffer's rows (other pixels untouched)."""
        rows = slice(self._top, self._top + labels.shape[0])
        inside = labels > 0
        target = self.labels_out[rows]
        target[inside] = lut[labels[inside]].astype(target.dtype)

    def _trim(self, comps: np.ndarray, open_mask: np.ndarray) -> None:
        """Drop rows above the context (``context_rows``: CONTEXT_ROWS, or a ring's reach) before the topmost
        unfinished component; with none, keep the last ``context_rows`` rows (the background above whatever
        starts in the next band: its distance transform and its ring see the rows a whole-slide run sees)."""
        rows_open = np.flatnonzero(open_mask.any(axis=1))
        self._holding = bool(rows_open.size)
        if rows_open.size:
            keep_from = max(0, int(rows_open[0]) - self.context_rows)
        else:
            keep_from = max(0, self._prob.shape[0] - self.context_rows)
        self._drop(keep_from)

    def _drop(self, keep_from: int) -> None:
        """Forget the buffer's rows above ``keep_from``."""
        if keep_from:
            self._prob = self._prob[keep_from:].copy()
            self._std = self._std[keep_from:].copy()
            if self._rgb is not None:
                self._rgb = self._rgb[keep_from:].copy()
            self._top += keep_from


def label_image(prob: np.ndarray, std: np.ndarray | None, params: NucleiParams, grid: Grid,
                rgb: np.ndarray | None = None, stain: StainProfile | None = None,
                ring_um: float = DEFAULT_RING_UM) -> list[Nucleus]:
    """All nuclei of a plain image's maps (one band); coordinates are image pixels when grid.scale is 1.
    With ``stain`` (and the image's ``rgb`` on the maps' grid) each nucleus carries its stain values."""
    labeller = BandLabeller(params, prob.shape[1], grid, prob.shape[0], stain=stain, ring_um=ring_um)
    return labeller.feed(prob, std, rgb=rgb) + labeller.finish()


def iter_bands(prob: np.ndarray, band_rows: int, overlap: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(y0, rows) bands of ``prob`` with ``overlap`` rows repeated from the previous band (tests, tools)."""
    y = 0
    while y < prob.shape[0]:
        start = max(0, y - overlap)
        yield start, prob[start:y + band_rows]
        y += band_rows
