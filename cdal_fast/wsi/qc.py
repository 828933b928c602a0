"""Quality-control heatmaps of a slide: nucleus density and vote uncertainty on a coarse grid.

Accumulated while the post-process stage reads the stitched maps band by band (no second pass
when nuclei are labelled), then written as two small colour PNGs beside the outputs
(``NAME.qc_density.png``, ``NAME.qc_uncertainty.png``) that the batch report shows:

* density: nucleus centroids per cell / the cell's sampled area, in nuclei per mm^2;
* uncertainty: mean vote standard deviation (0-0.5) over the cell's sampled pixels: where the
  diffusion votes disagree, i.e. where the model is unsure and a pathologist should look.

Cells hold at least :data:`MIN_CELL_UM` um (a density needs area to be more than 0 or 1 nucleus)
and at most :data:`MAX_CELLS` on the long side. Cells of which less than :data:`MIN_SAMPLED_FRACTION`
was sampled (no tile reached them, or a sliver at the slide's edge, whose density would be noise)
are drawn grey.
Memory: three float64 arrays of at most 256 x 256 cells, plus one band-sized mask while a band is added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .tiling import Coverage

__all__ = ["MIN_CELL_UM", "MAX_CELLS", "QcMaps", "colourise", "qc_scale"]

MIN_CELL_UM = 25.0
MAX_CELLS = 256
CHUNK_COLUMNS = 4096  # a band is added this many columns at a time (small temporaries)
MIN_SAMPLED_FRACTION = 0.5  # of a whole cell's area, for the cell to be drawn
UNSAMPLED_RGB = (225, 225, 225)
# A dark-to-light ramp (lightness rises monotonically), so a printout in grey keeps the order.
RAMP = np.array([(24, 20, 64), (88, 36, 128), (170, 60, 120), (232, 120, 60), (250, 214, 120), (255, 250, 220)],
                np.float64)


def colourise(values: np.ndarray, vmax: float) -> np.ndarray:
    """uint8 RGB of ``values`` on the ramp from 0 to ``vmax``; NaN (unsampled) grey."""
    rgb = np.empty((*values.shape, 3), np.uint8)
    rgb[:] = UNSAMPLED_RGB
    ok = np.isfinite(values)
    t = np.clip(values[ok] / vmax, 0.0, 1.0) if vmax > 0 else np.zeros(int(ok.sum()))
    pos = t * (len(RAMP) - 1)
    i = np.minimum(pos.astype(int), len(RAMP) - 2)
    frac = (pos - i)[:, None]
    rgb[ok] = np.rint(RAMP[i] * (1 - frac) + RAMP[i + 1] * frac).astype(np.uint8)
    return rgb


def qc_scale(values: np.ndarray) -> float:
    """The colour scale's top: the 99th percentile of the sampled cells (one hot cell does not
    flatten the rest), at least a tiny positive number."""
    ok = values[np.isfinite(values)]
    return float(max(np.percentile(ok, 99), 1e-9)) if ok.size else 1.0


@dataclass
class QcMaps:
    """Per-cell sums on a grid of ``cell`` working pixels (``mpp`` um each)."""

    cell: int
    mpp: float
    shape: tuple[int, int]
    nuclei: np.ndarray = field(repr=False)
    std_sum: np.ndarray = field(repr=False)
    pixels: np.ndarray = field(repr=False)
    written: dict | None = None  # what write() wrote: cell size and colour scales (for the summary)

    @classmethod
    def for_map(cls, work_h: int, work_w: int, work_mpp: float) -> QcMaps:
        cell = max(math.ceil(MIN_CELL_UM / work_mpp), math.ceil(max(work_h, work_w) / MAX_CELLS), 1)
        shape = (math.ceil(work_h / cell), math.ceil(work_w / cell))
        return cls(cell, float(work_mpp), shape, np.zeros(shape), np.zeros(shape), np.zeros(shape))

    def add_band(self, y: int, std: np.ndarray, c0: int, coverage: Coverage) -> None:
        """Add working rows [y, y + len(std)) x columns [c0, c0 + width) of the vote std (0-0.5);
        only pixels in sampled cells of ``coverage`` count."""
        n, w = std.shape
        b = coverage.block
        rows = (y + np.arange(n)) // b
        for a in range(0, w, CHUNK_COLUMNS):
            part = std[:, a:a + CHUNK_COLUMNS]
            sampled = coverage.cells[np.ix_(rows, (c0 + a + np.arange(part.shape[1])) // b)]
            self._accumulate(self.std_sum, np.where(sampled, part, np.float32(0)), y, c0 + a)
            self._accumulate(self.pixels, sampled.astype(np.float32), y, c0 + a)

    def _accumulate(self, target: np.ndarray, band: np.ndarray, y: int, c0: int) -> None:
        n, w = band.shape
        r_ids = (y + np.arange(n)) // self.cell
        c_ids = (c0 + np.arange(w)) // self.cell
        r_starts = np.flatnonzero(np.r_[True, np.diff(r_ids) > 0])
        c_starts = np.flatnonzero(np.r_[True, np.diff(c_ids) > 0])
        sums = np.add.reduceat(np.add.reduceat(band, r_starts, axis=0), c_starts, axis=1)
        target[np.ix_(r_ids[r_starts], c_ids[c_starts])] += sums

    def add_nucleus(self, x_work: float, y_work: float) -> None:
        r = min(self.shape[0] - 1, max(0, int(y_work // self.cell)))
        c = min(self.shape[1] - 1, max(0, int(x_work // self.cell)))
        self.nuclei[r, c] += 1

    def _drawn(self) -> np.ndarray:
        return self.pixels >= MIN_SAMPLED_FRACTION * self.cell * self.cell

    def density_per_mm2(self) -> np.ndarray:
        """Nuclei per mm^2 of sampled area per cell (NaN where too little was sampled)."""
        area_mm2 = self.pixels * (self.mpp * self.mpp) / 1e6
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self._drawn(), self.nuclei / area_mm2, np.nan)

    def mean_uncertainty(self) -> np.ndarray:
        """Mean vote std per cell (NaN where too little was sampled)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self._drawn(), self.std_sum / self.pixels, np.nan)

    def write(self, density_path: Path | None, uncertainty_path: Path) -> dict:
        """Write the heatmap PNGs (density only when nuclei were counted); their colour scales, for the summary."""
        from .outputs import write_png

        out = {"cell_um": self.cell * self.mpp}
        unc = self.mean_uncertainty()
        out["uncertainty_max"] = qc_scale(unc)
        write_png(uncertainty_path, colourise(unc, out["uncertainty_max"]))
        if density_path is not None:
            dens = self.density_per_mm2()
            out["density_max_per_mm2"] = qc_scale(dens)
            write_png(density_path, colourise(dens, out["density_max_per_mm2"]))
        self.written = out
        return out
