"""Bounds on what a slide's header or an option may make the pipeline allocate.

The working size (slide pixels at the model's resolution) decides the disk-backed maps (2 bytes per
pixel) and the stitching band (one tile row x the width, float32 per mask channel + 2), so it is
checked before either exists. ``--max-pixels`` lifts the bound for genuinely huge slides.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import SlideError

__all__ = ["DEFAULT_MAX_PIXELS", "SIDE_ASPECT_ALLOWANCE", "check_work_size"]

DEFAULT_MAX_PIXELS = 1e10  # working pixels per slide (a 200k x 200k level-0 slide at 0.25 um/px is 1e10 at 0.5)
SIDE_ASPECT_ALLOWANCE = 2.0  # a working side may be this many times sqrt(max_pixels) (narrow slides, TMAs)


def check_work_size(path: Path, work_h: int, work_w: int, work_mpp: float, max_pixels: float) -> None:
    """Refuse a working size whose maps (2 bytes per pixel on disk) or stitching band (one tile row x the
    width, float32) would be unreasonable, before anything is allocated: a header claiming 10^6 x 10^6 px,
    or a wrong ``--mpp``, ends here with the numbers instead of in a multi-GB allocation."""
    max_side = SIDE_ASPECT_ALLOWANCE * math.sqrt(max_pixels)
    if work_h * work_w > max_pixels or max(work_h, work_w) > max_side:
        raise SlideError(
            f"{path}: at the model's {work_mpp:g} um/px the slide is {work_w} x {work_h} working px "
            f"({work_w * work_h:.3g} px, longest side {max(work_h, work_w)}); the limit is {max_pixels:.3g} px and "
            f"{max_side:.0f} px per side. Check the slide's resolution (or --mpp); for a genuinely larger slide "
            "pass --max-pixels (disk: 2 bytes per working pixel; memory: ~3 KB per working pixel of width)")
