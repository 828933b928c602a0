"""Per-nucleus measurements and outline polygons from an instance label map.

All lengths are reported in um and areas in um^2, converted with the pixel size of the labelled
map; centroids and polygons are in level-0 pixel coordinates of the slide (``x = (col + 0.5) *
scale + x0``: pixel centres sit at half-integers, QuPath's convention), so a labelling done at a
coarser working scale still lands on the slide's own grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Polygon
from skimage.measure import find_contours, regionprops

from .stain import StainProfile, concentrations, ring_mask, stain_statistics

__all__ = ["CSV_FIELDS", "Grid", "Nucleus", "StainInput", "measure_objects", "outline"]

# Vertices closer than this (map pixels) to the straight line between their neighbours are dropped:
# the 0.5-level contour has one vertex per boundary pixel edge, most of them collinear.
SIMPLIFY_TOLERANCE_PX = 0.25
CONTOUR_LEVEL = 0.5  # half-way between background (0) and object (1)


@dataclass(frozen=True)
class Grid:
    """Where a labelled map sits on the slide.

    mpp: um per pixel of the labelled map. scale: level-0 pixels per map pixel. x0, y0: level-0
    position of the map's top-left corner (e.g. the row of the band's first row).
    """

    mpp: float
    scale: float = 1.0
    x0: float = 0.0
    y0: float = 0.0

    def __post_init__(self) -> None:
        for name in ("mpp", "scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"Grid.{name} must be a positive finite number, got {v!r}")

    @property
    def mpp0(self) -> float:
        """um per level-0 pixel."""
        return self.mpp / self.scale


@dataclass(frozen=True)
class Nucleus:
    """One nucleus: its outline (level-0 px, closed ring) and the measurements written per row."""

    id: int
    centroid_x_px: float
    centroid_y_px: float
    centroid_x_um: float
    centroid_y_um: float
    area_um2: float
    perimeter_um: float
    equivalent_diameter_um: float
    eccentricity: float
    solidity: float
    circularity: float
    mean_probability: float
    mean_uncertainty: float
    polygon: tuple[tuple[float, float], ...]
    # stain measurements (nucleus, cytoplasm ring, cell) in cdal_fast.nuclei.stain.stain_columns order;
    # empty when no stain is measured
    stain: tuple[float, ...] = ()

    def measurements(self) -> dict[str, float]:
        """Every field but the outline and the stain values, in CSV column order."""
        return {f: getattr(self, f) for f in CSV_FIELDS}

    def with_id(self, new_id: int) -> Nucleus:
        """The same nucleus under another id (ids are given in output order by the writer)."""
        return Nucleus(new_id, *(getattr(self, f.name) for f in fields(self)[1:]))


CSV_FIELDS = tuple(f.name for f in fields(Nucleus) if f.name not in ("polygon", "stain"))


@dataclass(frozen=True)
class StainInput:
    """What the stain measurements of one labelled map need, on the labels' grid.

    rgb: (H, W, 3) uint8 slide pixels. exclude: (H, W) bool, every nucleus's foreground (a ring never
    enters a nucleus). footprint: the disc whose dilation makes the ring (:func:`stain.ring_footprint`).
    """

    rgb: np.ndarray
    exclude: np.ndarray
    profile: StainProfile
    footprint: np.ndarray


def outline(mask: np.ndarray, grid: Grid, row0: int = 0, col0: int = 0) -> tuple[tuple[float, float], ...]:
    """Closed exterior ring of one object's boolean ``mask`` (a crop whose (0, 0) is map pixel (row0, col0)).

    The 0.5-level contour of the hole-filled mask, padded by one pixel so it closes; with
    find_contours' default (background fully connected) a 4-connected object gives a simple ring.
    """
    padded = np.pad(ndi.binary_fill_holes(mask), 1).astype(np.float32)
    contours = find_contours(padded, CONTOUR_LEVEL)
    ring = max(contours, key=len)  # the exterior (holes were filled; other pieces are diagonal-only)
    rows = ring[:, 0] - 1 + row0
    cols = ring[:, 1] - 1 + col0
    poly = Polygon(np.column_stack([cols + 0.5, rows + 0.5]))
    poly = poly.simplify(SIMPLIFY_TOLERANCE_PX, preserve_topology=True)
    if not poly.is_valid:
        fixed = shapely.make_valid(poly)
        poly = max(getattr(fixed, "geoms", [fixed]), key=lambda g: g.area)
    xy = np.asarray(poly.exterior.coords)
    return tuple((float(x * grid.scale + grid.x0), float(y * grid.scale + grid.y0)) for x, y in xy)


def measure_objects(labels: np.ndarray, prob: np.ndarray, std: np.ndarray | None, grid: Grid,
                    which: set[int] | None = None, stain: StainInput | None = None) -> list[Nucleus]:
    """Nuclei of ``labels`` (optionally only the labels in ``which``), ids = their labels.

    ``prob`` and ``std`` are the vote-mean probability and vote std on the same grid; without a
    std (a single-vote model) the uncertainty is NaN. ``stain`` adds the stain measurements.
    """
    if labels.shape != prob.shape or (std is not None and std.shape != prob.shape):
        raise ValueError(f"measure_objects: labels {labels.shape}, prob {prob.shape} and std "
                         f"{None if std is None else std.shape} must have the same shape")
    if stain is not None and (stain.rgb.shape != (*labels.shape, 3) or stain.exclude.shape != labels.shape):
        raise ValueError(f"measure_objects: rgb {stain.rgb.shape} and exclude {stain.exclude.shape} must "
                         f"cover the labels' {labels.shape}")
    intensity = np.stack([prob, std if std is not None else np.full_like(prob, np.nan)], axis=-1)
    out = []
    for rp in regionprops(labels, intensity_image=intensity.astype(np.float32)):
        if which is not None and rp.label not in which:
            continue
        n = _one(rp, grid)
        out.append(n if stain is None else replace(n, stain=_stain_values(rp, stain, grid.mpp)))
    return out


def _stain_values(rp, stain: StainInput, mpp: float) -> tuple[float, ...]:
    """The nucleus's stain statistics from a window of its bounding box plus the ring's reach."""
    pad = stain.footprint.shape[0] // 2
    h, w = stain.exclude.shape
    r0, c0, r1, c1 = rp.bbox
    wr0, wc0, wr1, wc1 = max(0, r0 - pad), max(0, c0 - pad), min(h, r1 + pad), min(w, c1 + pad)
    nucleus = np.zeros((wr1 - wr0, wc1 - wc0), bool)
    nucleus[r0 - wr0:r1 - wr0, c0 - wc0:c1 - wc0] = rp.image
    ring = ring_mask(nucleus, stain.exclude[wr0:wr1, wc0:wc1], stain.footprint)
    conc = concentrations(stain.rgb[wr0:wr1, wc0:wc1], stain.profile)
    return stain_statistics(conc, nucleus, ring, mpp * mpp)


# Corners of a pixel around its centre: the convex hull of an object's pixel squares.
_CORNERS = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])


def _hull_area(coords: np.ndarray) -> float:
    """Area (px^2) of the convex hull of the object's pixel squares (a 1-pixel object: 1).

    Not regionprops' ``solidity``: its pixel-rasterised hull costs ~10 ms per nucleus (most of the
    measuring time); the hull of the squares is exact geometry and gives 1.0 for any rectangle.
    """
    pts = (coords[:, None, :] + _CORNERS[None]).reshape(-1, 2)
    return float(shapely.MultiPoint(pts).convex_hull.area)


def _eccentricity(coords: np.ndarray) -> float:
    """Eccentricity of the ellipse with the object's second central moments (as regionprops defines it).

    From the pixel coordinates' covariance, equal to regionprops' inertia-tensor eigenvalues but
    without its per-object moment images.
    """
    if coords.shape[0] < 2:
        return 0.0
    small, large = np.linalg.eigvalsh(np.cov(coords.T, bias=True))
    return float(math.sqrt(max(0.0, 1.0 - small / large))) if large > 0 else 0.0


def _one(rp, grid: Grid) -> Nucleus:
    mpp = grid.mpp
    area_px = float(rp.area)
    perim_px = float(rp.perimeter)
    # The discrete perimeter of a very small blob can undercut 2*sqrt(pi*A): clip to a disc's 1.0.
    circ = min(1.0, 4.0 * math.pi * area_px / perim_px**2) if perim_px > 0 else 1.0
    cy, cx = rp.centroid
    x_px = (cx + 0.5) * grid.scale + grid.x0
    y_px = (cy + 0.5) * grid.scale + grid.y0
    r0, c0, _, _ = rp.bbox
    mean_p, mean_s = (float(v) for v in rp.intensity_mean)
    coords = rp.coords.astype(np.float64)
    return Nucleus(
        id=int(rp.label),
        centroid_x_px=float(x_px), centroid_y_px=float(y_px),
        centroid_x_um=float(x_px * grid.mpp0), centroid_y_um=float(y_px * grid.mpp0),
        area_um2=area_px * mpp * mpp,
        perimeter_um=perim_px * mpp,
        equivalent_diameter_um=math.sqrt(4.0 * area_px / math.pi) * mpp,
        eccentricity=_eccentricity(coords),
        solidity=float(area_px / _hull_area(coords)),
        circularity=float(circ),
        mean_probability=mean_p,
        mean_uncertainty=mean_s,
        polygon=outline(rp.image, grid, r0, c0),
    )
