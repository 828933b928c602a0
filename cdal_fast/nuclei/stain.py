"""Brightfield stain maths: optical density, colour deconvolution, per-nucleus stain statistics,
IHC positivity classes, Macenko stain estimation and normalisation. Pure numpy / scipy, no I/O.

Optical density (OD) of a channel with intensity ``I`` (0-255) is ``-log10(max(I, 1) / 255)``: 0
for white glass, at most ``log10(255) = 2.41``. A stain is a unit vector of the OD it adds to
(R, G, B) per unit of concentration. Colour deconvolution solves ``OD = c1 s1 + c2 s2 + c3 s3``
per pixel, where ``s3`` is the normalised cross product of the two stains: the two concentrations
are then the least-squares fit of the pixel's OD on the two stain vectors and whatever does not
fit goes to the residual. The concentrations are what QuPath calls e.g. "DAB OD".

Default vectors: Ruifrok & Johnston (2001), *Quantification of histochemical staining by color
deconvolution*, Anal Quant Cytol Histol 23:291-299, normalised vectors of haematoxylin (0.650,
0.704, 0.286), eosin (0.072, 0.990, 0.105) and DAB (0.268, 0.570, 0.776); the same numbers as
ImageJ/Fiji's "H DAB" preset.

Macenko et al. (2009), *A method for normalizing histology slides for quantitative analysis*
(ISBI): the OD of stained pixels lies near the plane of the two stains; the plane is spanned by the
two largest principal directions of the OD, and the stain vectors are the directions at robust
extreme angles (1st and 99th percentiles) in that plane. Normalisation maps each pixel's two
concentrations, scaled by the 99th-percentile concentrations, onto a reference's stain vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["STAINS", "STAIN_CHOICES", "CLASS_NAMES", "CLASS_COLOURS", "COMPARTMENTS", "StainProfile",
           "PositivityRule", "default_profile", "optical_density", "concentrations", "stain_statistics",
           "stain_columns", "ring_footprint", "estimate_macenko", "normalise_stains", "positivity_summary",
           "StainEstimationError", "STAT_COUNT", "ring_mask",
           "StainNormaliser", "DEFAULT_RING_UM", "DEFAULT_THRESHOLDS"]

# Normalised OD vectors (R, G, B) of Ruifrok & Johnston (2001).
HEMATOXYLIN = (0.650, 0.704, 0.286)
EOSIN = (0.072, 0.990, 0.105)
DAB = (0.268, 0.570, 0.776)
# stain kind -> ((name, vector), (name, vector)); names as QuPath spells them in measurements
STAINS = {
    "h-e": (("Hematoxylin", HEMATOXYLIN), ("Eosin", EOSIN)),
    "h-dab": (("Hematoxylin", HEMATOXYLIN), ("DAB", DAB)),
}
STAIN_CHOICES = (*STAINS, "none")  # "none": no stain measurements
OD_WHITE = 255.0  # background intensity of every channel (QuPath's default "max" values)

# IHC positivity classes and QuPath-like display colours (blue negative, yellow / orange / red 1+ / 2+ / 3+)
CLASS_NAMES = ("Negative", "1+", "2+", "3+")
CLASS_COLOURS = ((112, 112, 225), (255, 215, 0), (225, 150, 50), (200, 50, 50))
# QuPath's positive cell detection defaults: "Nucleus: DAB OD mean" against 0.2 / 0.4 / 0.6
DEFAULT_THRESHOLDS = (0.2, 0.4, 0.6)
COMPARTMENTS = ("nucleus", "cell", "cytoplasm")
# Width of the ring around each nucleus (cytoplasm; cell = nucleus + ring). Thinner than QuPath's 5 um
# cell expansion: in dense tissue a wide ring reaches into the neighbours (docs/nuclei.md).
DEFAULT_RING_UM = 2.0

# Macenko estimation (the paper's values: beta 0.15 OD, alpha 1 %)
MACENKO_MIN_OD = 0.15
MACENKO_PERCENTILE = 1.0
MAX_CONCENTRATION_PERCENTILE = 99.0
MIN_ESTIMATION_PIXELS = 500

_OD_LUT = (-np.log10(np.maximum(np.arange(256), 1) / OD_WHITE)).astype(np.float32)
# statistics per nucleus, per stain: nucleus mean, nucleus max, cytoplasm mean, cytoplasm max, cell mean
_PER_STAIN = (("nucleus", "mean"), ("nucleus", "max"), ("cytoplasm", "mean"), ("cytoplasm", "max"),
              ("cell", "mean"))
STAT_COUNT = 2 * len(_PER_STAIN) + 1  # + the cell area


class StainEstimationError(ValueError):
    """Too few stained pixels (or degenerate colours) to estimate stain vectors from."""


def _unit(v: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    a = np.asarray(v, np.float64)
    n = float(np.linalg.norm(a))
    if not (math.isfinite(n) and n > 0):
        raise ValueError(f"a stain vector must be non-zero and finite, got {v!r}")
    return a / n


@dataclass(frozen=True)
class StainProfile:
    """Two stains: their names, unit OD vectors and (for normalisation) their 99th-percentile
    concentrations; ``source`` says where the vectors come from (defaults, or an estimate)."""

    kind: str  # "h-e" or "h-dab"
    names: tuple[str, str]
    vectors: tuple[tuple[float, float, float], tuple[float, float, float]]
    max_concentrations: tuple[float, float] | None = None
    source: str = "given"

    def __post_init__(self) -> None:
        if self.kind not in STAINS:
            raise ValueError(f"StainProfile.kind must be one of {', '.join(STAINS)}, got {self.kind!r}")
        if len(self.names) != 2 or not all(isinstance(n, str) and n for n in self.names):
            raise ValueError(f"StainProfile.names must be two stain names, got {self.names!r}")
        s1, s2 = (_unit(v) for v in self.vectors)
        if not np.linalg.norm(np.cross(s1, s2)) > 1e-6:
            raise ValueError(f"StainProfile: the two stain vectors are parallel: {self.vectors!r}")
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "vectors", (tuple(float(x) for x in s1), tuple(float(x) for x in s2)))
        if self.max_concentrations is not None:
            mc = tuple(float(x) for x in self.max_concentrations)
            if len(mc) != 2 or not all(math.isfinite(x) and x > 0 for x in mc):
                raise ValueError(f"StainProfile.max_concentrations must be two positive numbers, got {mc!r}")
            object.__setattr__(self, "max_concentrations", mc)

    @property
    def unmixing(self) -> np.ndarray:
        """(3, 2) float32: OD row vector -> the two concentrations."""
        return _unmixing(self.vectors)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "names": list(self.names), "vectors": [list(v) for v in self.vectors],
                "max_concentrations": None if self.max_concentrations is None else list(self.max_concentrations),
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> StainProfile:
        mc = d.get("max_concentrations")
        return cls(d["kind"], tuple(d["names"]), tuple(tuple(v) for v in d["vectors"]),
                   None if mc is None else tuple(mc), d.get("source", "file"))


@lru_cache(maxsize=64)
def _unmixing(vectors: tuple[tuple[float, float, float], tuple[float, float, float]]) -> np.ndarray:
    """Columns 1-2 of the inverse of [s1; s2; s1 x s2 normalised] (read-only, shared)."""
    s1, s2 = (np.asarray(v, np.float64) for v in vectors)
    s3 = np.cross(s1, s2)
    inverse = np.linalg.inv(np.stack([s1, s2, s3 / np.linalg.norm(s3)]))[:, :2].astype(np.float32)
    inverse.flags.writeable = False
    return inverse


def default_profile(kind: str) -> StainProfile:
    """Ruifrok & Johnston's vectors for ``kind`` ("h-e" or "h-dab")."""
    if kind not in STAINS:
        raise ValueError(f"unknown stain {kind!r}; choose one of {', '.join(STAINS)}")
    (n1, v1), (n2, v2) = STAINS[kind]
    return StainProfile(kind, (n1, n2), (v1, v2), source="Ruifrok & Johnston (2001)")


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """float32 OD of uint8 RGB pixels (same shape)."""
    if rgb.dtype != np.uint8:
        raise ValueError(f"optical_density needs uint8 RGB, got {rgb.dtype}")
    return _OD_LUT[rgb]


def concentrations(rgb: np.ndarray, profile: StainProfile) -> np.ndarray:
    """(..., 2) float32 stain concentrations (OD units) of uint8 RGB pixels (..., 3)."""
    return optical_density(rgb) @ profile.unmixing


def ring_footprint(ring_px: float) -> np.ndarray:
    """Disc of pixels within ``ring_px`` of the centre (Euclidean), the dilation that makes the ring."""
    r = int(math.floor(ring_px))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= ring_px * ring_px + 1e-9


def _mean_max(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.max())


def stain_statistics(conc: np.ndarray, nucleus: np.ndarray, ring: np.ndarray, pixel_area_um2: float) -> tuple:
    """Per-nucleus numbers from a window's concentrations (h, w, 2), the nucleus mask and its ring
    (cytoplasm estimate; cell = nucleus + ring), in :func:`stain_columns` order."""
    out: list[float] = []
    cell = nucleus | ring
    for s in range(2):
        c = conc[..., s]
        n_mean, n_max = _mean_max(c[nucleus])
        r_mean, r_max = _mean_max(c[ring])
        out += [n_mean, n_max, r_mean, r_max, float(c[cell].mean())]
    out.append(float(cell.sum()) * pixel_area_um2)
    return tuple(out)


def stain_columns(profile: StainProfile) -> list[tuple[str, str]]:
    """(CSV column, QuPath measurement name) of each :func:`stain_statistics` value."""
    cols = []
    for name in profile.names:
        for comp, stat in _PER_STAIN:
            cols.append((f"{comp}_{name.lower()}_od_{stat}", f"{comp.capitalize()}: {name} OD {stat}"))
    cols.append(("cell_area_um2", "Cell: Area um^2"))
    return cols


def _stat_index(stain: int, compartment: str) -> int:
    return stain * len(_PER_STAIN) + _PER_STAIN.index((compartment, "mean"))


@dataclass(frozen=True)
class PositivityRule:
    """IHC classes by the DAB OD mean of one compartment: below ``thresholds[0]`` Negative, then
    1+ / 2+ / 3+ from each threshold up. Defaults are QuPath's positive cell detection defaults
    (Nucleus: DAB OD mean, 0.2 / 0.4 / 0.6), not tuned here."""

    thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS
    compartment: str = "nucleus"

    def __post_init__(self) -> None:
        t = tuple(self.thresholds)
        if (len(t) != 3 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in t)
                or not 0 < t[0] < t[1] < t[2]):
            raise ValueError(f"positivity thresholds must be three increasing positive OD values, got {t!r}")
        if self.compartment not in COMPARTMENTS:
            raise ValueError(f"positivity compartment must be one of {', '.join(COMPARTMENTS)}, "
                             f"got {self.compartment!r}")
        object.__setattr__(self, "thresholds", tuple(float(x) for x in t))

    @property
    def index(self) -> int:
        """Position of the deciding value (the DAB mean of the compartment) in a nucleus's statistics."""
        return _stat_index(1, self.compartment)

    def classify(self, dab_mean: float) -> int:
        """0 (Negative) .. 3 (3+); an undefined value (a nucleus with no ring pixels) is Negative."""
        if not math.isfinite(dab_mean):
            return 0
        return sum(dab_mean >= t for t in self.thresholds)

    def to_dict(self) -> dict:
        return {"measurement": f"{self.compartment.capitalize()}: DAB OD mean",
                "thresholds": list(self.thresholds), "classes": list(CLASS_NAMES)}


def positivity_summary(counts: list[int] | np.ndarray, tissue_area_um2: float | None, rule: PositivityRule) -> dict:
    """Counts per class, per mm^2 of tissue, the positive percentage and the H-score
    (1 x %1+ + 2 x %2+ + 3 x %3+, 0-300)."""
    counts = [int(c) for c in counts]
    total = sum(counts)
    pct = [100.0 * c / total if total else 0.0 for c in counts]
    per_mm2 = None
    if tissue_area_um2:
        per_mm2 = {n: round(c / (tissue_area_um2 / 1e6), 3) for n, c in zip(CLASS_NAMES, counts)}
    return {"rule": rule.to_dict(), "counts": dict(zip(CLASS_NAMES, counts)), "per_mm2_tissue": per_mm2,
            "positive_percent": round(sum(pct[1:]), 3) if total else None,
            "h_score": round(pct[1] + 2 * pct[2] + 3 * pct[3], 3) if total else None}


# -- Macenko -------------------------------------------------------------------------------------
def _stained_od(rgb: np.ndarray) -> np.ndarray:
    od = optical_density(np.asarray(rgb, np.uint8).reshape(-1, 3)).astype(np.float64)
    return od[(od > MACENKO_MIN_OD).all(axis=1)]


def estimate_macenko(rgb: np.ndarray, kind: str = "h-e") -> StainProfile:
    """The two stain vectors of ``kind`` estimated from uint8 RGB pixels (any shape (..., 3)), with
    their 99th-percentile concentrations. The vector nearer Ruifrok's haematoxylin is the first.
    Raises :class:`StainEstimationError` when fewer than 500 pixels are stained."""
    od = _stained_od(rgb)
    if od.shape[0] < MIN_ESTIMATION_PIXELS:
        raise StainEstimationError(f"only {od.shape[0]} stained pixels (OD > {MACENKO_MIN_OD} in every channel); "
                                   f"at least {MIN_ESTIMATION_PIXELS} are needed to estimate stain vectors")
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, [2, 1]]  # the two largest principal directions
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [MACENKO_PERCENTILE, 100.0 - MACENKO_PERCENTILE])
    cands = [plane @ np.array([math.cos(a), math.sin(a)]) for a in (lo, hi)]
    cands = [v * (-1.0 if v.sum() < 0 else 1.0) for v in cands]
    if min(float(np.linalg.norm(v)) for v in cands) < 1e-9 or float(np.abs(np.cross(*cands)).max()) < 1e-6:
        raise StainEstimationError("the stained pixels have a single colour; two stains cannot be separated")
    (n1, ref_h), (n2, _) = STAINS[kind]
    h_first = abs(_unit(cands[0]) @ _unit(ref_h)) >= abs(_unit(cands[1]) @ _unit(ref_h))
    v1, v2 = (cands[0], cands[1]) if h_first else (cands[1], cands[0])
    profile = StainProfile(kind, (n1, n2), (tuple(_unit(v1)), tuple(_unit(v2))), source="Macenko estimate")
    conc = od.astype(np.float32) @ profile.unmixing
    maxc = np.percentile(conc, MAX_CONCENTRATION_PERCENTILE, axis=0)
    if not (maxc > 0).all():
        raise StainEstimationError(f"a stain has no positive concentration ({maxc.tolist()})")
    return StainProfile(kind, (n1, n2), profile.vectors, tuple(float(x) for x in maxc), "Macenko estimate")


def normalise_stains(rgb: np.ndarray, source: StainProfile, target: StainProfile) -> np.ndarray:
    """uint8 RGB with ``source``'s two stains re-drawn in ``target``'s vectors and concentration scale
    (the residual is dropped, as in Macenko's method)."""
    if source.max_concentrations is None or target.max_concentrations is None:
        raise ValueError("normalise_stains needs the 99th-percentile concentrations of both profiles")
    conc = concentrations(rgb, source)
    conc *= np.asarray(target.max_concentrations, np.float32) / np.asarray(source.max_concentrations, np.float32)
    np.maximum(conc, 0.0, out=conc)
    od = conc @ np.asarray(target.vectors, np.float32)
    out = OD_WHITE * np.power(np.float32(10.0), -od)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class StainNormaliser:
    """Callable uint8 RGB -> uint8 RGB: estimate the image's own stains (Macenko) and redraw them in
    ``reference``'s; an image too unstained to estimate from is returned unchanged (``skipped``
    counts them). Picklable (a tile loader's workers carry it)."""

    def __init__(self, reference: StainProfile, kind: str = "h-e") -> None:
        if reference.max_concentrations is None:
            raise ValueError("a normalisation reference needs its 99th-percentile concentrations")
        self.reference, self.kind, self.skipped = reference, kind, 0

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        try:
            source = estimate_macenko(rgb, self.kind)
        except StainEstimationError:
            self.skipped += 1
            return rgb
        return normalise_stains(rgb, source, self.reference)


def ring_mask(nucleus: np.ndarray, exclude: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Pixels within the footprint's radius of ``nucleus``, outside it and outside ``exclude`` (every
    nucleus's foreground): the nucleus's ring of cytoplasm. Rings of neighbours may overlap."""
    from scipy import ndimage as ndi  # on use: this module is imported at CLI start-up (its constants)

    grown = ndi.binary_dilation(nucleus, structure=footprint)
    return grown & ~nucleus & ~exclude
