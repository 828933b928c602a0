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
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from scipy import ndimage as ndi

from .measure import Grid, Nucleus, measure_objects
from .params import NucleiParams
from .separate import EIGHT_CONNECTED, foreground, label_nuclei

__all__ = ["BandLabeller", "CONTEXT_ROWS", "label_image"]

# Rows kept above the topmost unfinished component: its nearest background (distance transform)
# is at most one pixel outside it; two rows leave a margin for the rounding of the h-maxima.
CONTEXT_ROWS = 2


class BandLabeller:
    """Feed probability (and vote std) bands top to bottom; receive each nucleus once, complete.

    ``grid`` places the maps on the slide (um per map pixel, level-0 pixels per map pixel, origin).
    Ids run 1, 2, ... in emission order. ``height`` (map rows), when given, is checked by
    :meth:`finish`. ``labels_out``, when given, is a (height, width) integer array (a disk-backed
    map on slides) into which each emitted nucleus's pixels are painted with its id, so a label
    raster costs no second labelling and agrees with the outlines.
    """

    def __init__(self, params: NucleiParams, width: int, grid: Grid, height: int | None = None,
                 labels_out: np.ndarray | None = None) -> None:
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

    def feed(self, prob: np.ndarray, std: np.ndarray | None = None, y0: int | None = None) -> list[Nucleus]:
        """Add the band whose first row is map row ``y0`` (default: the next unseen row).

        Returns the nuclei finished by this band. Rows before ``rows_seen`` are ignored (overlap);
        a gap (``y0 > rows_seen``) is an error, since objects across it could not be resolved.
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
        skip = self._seen - y0
        new_p = np.asarray(prob[skip:], np.float32)
        if new_p.shape[0] == 0:
            return []
        new_s = np.asarray(std[skip:], np.float32) if std is not None else np.full_like(new_p, np.nan)
        self._prob = np.concatenate([self._prob, new_p])
        self._std = np.concatenate([self._std, new_s])
        self._seen += new_p.shape[0]
        if self.height is not None and self._seen > self.height:
            raise ValueError(f"BandLabeller.feed: {self._seen} rows fed, more than the declared height {self.height}")
        return self._emit(final=False)

    def skip_background(self, rows: int) -> None:
        """Advance over ``rows`` map rows known to be background (e.g. no sampled tile reached them)
        without reading them. Exactly what feeding those rows as zeros does, and allowed only while the
        buffer is empty: an unfinished component held now needs the real rows below it to be closed."""
        if self._finished:
            raise RuntimeError("BandLabeller.skip_background after finish()")
        if self._prob.shape[0]:
            raise ValueError(f"BandLabeller.skip_background: {self._prob.shape[0]} rows of unfinished components "
                             "are held; feed the next rows instead")
        if self.height is not None and self._seen + rows > self.height:
            raise ValueError(f"BandLabeller.skip_background: {self._seen + rows} rows, more than the declared "
                             f"height {self.height}")
        self._seen += int(rows)
        self._top = self._seen

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
        open_ids = np.array([], np.int32) if final else np.unique(comps[-1][comps[-1] > 0])
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
            for n in measure_objects(labels, self._prob, self._std, band_grid):
                self.emitted += 1
                lut[n.id] = self.emitted
                nuclei.append(n.with_id(self.emitted))
            if self.labels_out is not None:
                self._paint(labels, lut)
            self._prob[done] = 0.0
        self._trim(comps, open_mask)
        return nuclei

    def _paint(self, labels: np.ndarray, lut: np.ndarray) -> None:
        """Write the emitted ids into ``labels_out`` at the buffer's rows (other pixels untouched)."""
        rows = slice(self._top, self._top + labels.shape[0])
        inside = labels > 0
        target = self.labels_out[rows]
        target[inside] = lut[labels[inside]].astype(target.dtype)

    def _trim(self, comps: np.ndarray, open_mask: np.ndarray) -> None:
        """Drop rows above CONTEXT_ROWS before the topmost unfinished component (all rows if none)."""
        rows_open = np.flatnonzero(open_mask.any(axis=1))
        keep_from = self._prob.shape[0] if rows_open.size == 0 else max(0, int(rows_open[0]) - CONTEXT_ROWS)
        if keep_from:
            self._prob = self._prob[keep_from:].copy()
            self._std = self._std[keep_from:].copy()
            self._top += keep_from


def label_image(prob: np.ndarray, std: np.ndarray | None, params: NucleiParams, grid: Grid) -> list[Nucleus]:
    """All nuclei of a plain image's maps (one band); coordinates are image pixels when grid.scale is 1."""
    labeller = BandLabeller(params, prob.shape[1], grid, prob.shape[0])
    return labeller.feed(prob, std) + labeller.finish()


def iter_bands(prob: np.ndarray, band_rows: int, overlap: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(y0, rows) bands of ``prob`` with ``overlap`` rows repeated from the previous band (tests, tools)."""
    y = 0
    while y < prob.shape[0]:
        start = max(0, y - overlap)
        yield start, prob[start:y + band_rows]
        y += band_rows
