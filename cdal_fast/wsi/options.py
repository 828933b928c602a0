"""How one slide is processed: tiling, tissue, region of interest, outputs, nuclei. Frozen and checked once.

These are the slide stages' own settings; which model runs, on what, with how many steps and votes
and at which threshold is the job's (:class:`cdal_fast.job.SegmentJob`, which holds one of these).
Every value is resolved (no "default" placeholders) and validated at construction, so a stage never
meets a batch size of 0 or a NaN threshold deep inside a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..nuclei import params as nuclei_defaults
from ..nuclei.stain import (
    COMPARTMENTS,
    DEFAULT_RING_UM,
    DEFAULT_THRESHOLDS,
    STAIN_CHOICES,
    PositivityRule,
    StainProfile,
)
from ..sampling.dihedral import NUM_DIHEDRAL
from .limits import DEFAULT_MAX_PIXELS
from .mpp import MAX_PLAUSIBLE_MPP, MIN_PLAUSIBLE_MPP
from .tiling import TILINGS
from .tissue import DEFAULT_MIN_AREA_UM2
from .writer import PYRAMID_LAYOUTS

__all__ = ["SegmentOptions", "OptionsError", "STAIN_VECTOR_CHOICES", "MAX_CELL_RING_UM"]

STAIN_VECTOR_CHOICES = ("default", "estimate")
MAX_CELL_RING_UM = 20.0


class OptionsError(ValueError):
    """An option value a run cannot honour (the message names the option and the allowed range)."""


@dataclass(frozen=True)
class SegmentOptions:
    batch_size: int = 8
    seed: int = 0
    tile_overlap: int = 64  # model pixels; the job's default is a quarter of the tile (blend), 0 (shifted)
    tiling: str = "blend"  # "blend": overlapping tiles, all votes each; "shifted": one offset grid per vote
    vote_frames: tuple[int, ...] = ()  # shifted tiling: each vote's dihedral code (0 = none); one per vote
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
    # Nuclei as objects (binary nucleus models only; see nuclei_stage.py and docs/nuclei.md)
    nuclei: bool = True  # label nuclei and add their numbers to the JSON
    nuclei_geojson: bool = True  # NAME.nuclei.geojson (QuPath detections)
    nuclei_gzip: bool = False  # ... as NAME.nuclei.geojson.gz
    nuclei_csv: bool = True  # NAME.nuclei.csv (one row per nucleus)
    save_labels: bool = False  # NAME.labels.ome.tif (uint32 instance ids on the slide's grid)
    nuclei_threshold: float = nuclei_defaults.DEFAULT_PROB_THRESHOLD  # tuned for AJI, apart from the mask's
    nuclei_h_um: float = nuclei_defaults.DEFAULT_MARKER_H_UM
    nuclei_min_area_um2: float = nuclei_defaults.DEFAULT_MIN_AREA_UM2
    max_pixels: float = DEFAULT_MAX_PIXELS  # bound on working pixels (the maps, the stitching band); --max-pixels
    # Stains (docs/nuclei.md): what is measured under each nucleus, IHC positivity, stain normalisation
    stain: str = "h-e"  # "h-e", "h-dab" (adds IHC positivity classes) or "none"
    stain_vectors: str = "default"  # "default" (Ruifrok-Johnston) or "estimate" (Macenko, per slide)
    cell_ring_um: float = DEFAULT_RING_UM  # width of the ring around each nucleus (cytoplasm / cell)
    positivity_thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS  # DAB OD for 1+ / 2+ / 3+ (QuPath's)
    positivity_compartment: str = "nucleus"  # whose DAB OD mean decides the class
    nuclei_parquet: bool = False  # NAME.nuclei.parquet (GeoParquet; needs pyarrow)
    stain_normalise: bool = False  # map each slide's stains onto the model's reference before sampling
    stain_reference: StainProfile | None = None  # the model's reference (the job layer loads it)
    report: bool = True  # OUT/report.html, rewritten as inputs finish

    def __post_init__(self) -> None:
        object.__setattr__(self, "positivity_thresholds", tuple(self.positivity_thresholds))
        object.__setattr__(self, "vote_frames", tuple(self.vote_frames))
        for name, ok, rule in self._rules():
            if not ok:
                raise OptionsError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        # the nucleus parameters have their own rules (NucleiParams), checked here so a bad value fails first
        nuclei_defaults.NucleiParams(self.nuclei_threshold, self.nuclei_h_um, self.nuclei_min_area_um2)
        try:
            PositivityRule(self.positivity_thresholds, self.positivity_compartment)
        except ValueError as exc:
            raise OptionsError(str(exc)) from None
        if self.stain_normalise and (self.stain_reference is None or self.stain_reference.max_concentrations is None):
            raise OptionsError("stain_normalise needs the model's stain reference (stain_reference, with its "
                               "99th-percentile concentrations)")

    def _rules(self) -> list[tuple[str, bool, str]]:
        def finite(v: object) -> bool:
            return isinstance(v, (int, float)) and math.isfinite(v)

        return [
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1"),
            ("seed", isinstance(self.seed, int) and self.seed >= 0, "an integer >= 0"),
            ("tile_overlap", isinstance(self.tile_overlap, int) and self.tile_overlap >= 0, "an integer >= 0"),
            ("tiling", self.tiling in TILINGS, f"one of {', '.join(TILINGS)}"),
            ("vote_frames", (len(self.vote_frames) >= 1 if self.tiling == "shifted" else not self.vote_frames)
             and all(isinstance(c, int) and 0 <= c < NUM_DIHEDRAL for c in self.vote_frames),
             f"one dihedral code in [0, {NUM_DIHEDRAL}) per vote with shifted tiling, and empty otherwise"),
            ("workers", isinstance(self.workers, int) and self.workers >= 0, "an integer >= 0"),
            ("mpp", self.mpp is None or (finite(self.mpp) and MIN_PLAUSIBLE_MPP <= self.mpp <= MAX_PLAUSIBLE_MPP),
             f"None or within {MIN_PLAUSIBLE_MPP:g}-{MAX_PLAUSIBLE_MPP:g} um/px"),
            ("thumbnail_side", isinstance(self.thumbnail_side, int) and self.thumbnail_side >= 1, "an integer >= 1"),
            ("tissue_threshold", self.tissue_threshold is None or (finite(self.tissue_threshold)
                                                                   and 0 <= self.tissue_threshold < 255),
             "None or in [0, 255)"),
            ("tissue_min_area_um2", finite(self.tissue_min_area_um2) and self.tissue_min_area_um2 > 0, "> 0"),
            ("pyramid_layout", self.pyramid_layout in PYRAMID_LAYOUTS, f"one of {', '.join(PYRAMID_LAYOUTS)}"),
            ("max_pixels", finite(self.max_pixels) and self.max_pixels >= 1, ">= 1"),
            ("stain", self.stain in STAIN_CHOICES, f"one of {', '.join(STAIN_CHOICES)}"),
            ("stain_vectors", self.stain_vectors in STAIN_VECTOR_CHOICES, f"one of {', '.join(STAIN_VECTOR_CHOICES)}"),
            ("cell_ring_um", finite(self.cell_ring_um) and 0 <= self.cell_ring_um <= MAX_CELL_RING_UM,
             f"in [0, {MAX_CELL_RING_UM:g}] um"),
            ("positivity_compartment", self.positivity_compartment in COMPARTMENTS,
             f"one of {', '.join(COMPARTMENTS)}"),
            ("stain_reference", self.stain_reference is None or isinstance(self.stain_reference, StainProfile),
             "None or a StainProfile"),
        ]
