"""Post-processing parameters of nucleus instance separation, validated once at construction.

Physical units (um, um^2) rather than pixels, so one set of defaults serves every resolution: the
slide pipeline labels its maps at the model's working scale, the evaluation at the tile's own grid.
The defaults were grid-searched for AJI on the annotated MoNuSeg *training* tiles with the shipped
model (``train/results/nuclei_postprocess.md``); validation tiles were not used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["NucleiParams", "DEFAULT_PARAMS"]

# Tuned defaults (see the module docstring and train/results/nuclei_postprocess.md).
DEFAULT_PROB_THRESHOLD = 0.5
DEFAULT_MARKER_H_UM = 0.25
DEFAULT_MIN_AREA_UM2 = 3.0
# A foreground component taller than this is cut at a band border (see bands.py): bounded memory
# wins over exactness for such (non-nucleus) structures; real nuclei are < 30 um.
DEFAULT_MAX_COMPONENT_UM = 256.0


@dataclass(frozen=True)
class NucleiParams:
    """How the vote-mean probability becomes nuclei.

    prob_threshold: foreground where the vote-mean probability is >= this (0 < t < 1).
    marker_h_um: h of the h-maxima markers on the distance transform, in um; a saddle less deep
        than h between two distance peaks does not split a blob (larger h: fewer splits).
    min_area_um2: objects smaller than this are dropped (noise specks, half-nuclei cut by tiles).
    max_component_um: height above which a connected foreground region is no longer kept whole
        in the band buffer (memory bound on slides).
    """

    prob_threshold: float = DEFAULT_PROB_THRESHOLD
    marker_h_um: float = DEFAULT_MARKER_H_UM
    min_area_um2: float = DEFAULT_MIN_AREA_UM2
    max_component_um: float = DEFAULT_MAX_COMPONENT_UM

    def __post_init__(self) -> None:
        checks = {
            "prob_threshold": 0.0 < self.prob_threshold < 1.0,
            "marker_h_um": self.marker_h_um > 0.0,
            "min_area_um2": self.min_area_um2 >= 0.0,
            "max_component_um": self.max_component_um > 0.0,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
                rule = {"prob_threshold": "strictly between 0 and 1", "marker_h_um": "> 0",
                        "min_area_um2": ">= 0", "max_component_um": "> 0"}[name]
                raise ValueError(f"NucleiParams.{name} must be a finite number {rule}, got {value!r}")

    def to_dict(self) -> dict[str, float]:
        """Plain dict for the per-slide JSON (which parameters made these objects)."""
        return asdict(self)


DEFAULT_PARAMS = NucleiParams()
