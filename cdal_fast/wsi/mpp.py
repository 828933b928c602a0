"""Level-0 resolution from what a slide records: measured pixel size first, objective power as a fallback.

Scanners record the pixel size (um/px) in format-specific places; some files only record the
objective magnification. The fallback uses the common whole-slide convention that a 40x scan is
0.25 um/px and a 20x scan 0.5 um/px (mpp = 10 / power). Real scanners differ by a few percent,
so the summary JSON carries a warning whenever the fallback was used. Anisotropic pixels
(X != Y) cannot be resampled to the model's square pixels correctly, so they are an error unless
the user states the resolution with ``--mpp``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MppInfo", "MIN_PLAUSIBLE_MPP", "MAX_PLAUSIBLE_MPP", "MICRONS_AT_1X", "ANISOTROPY_TOLERANCE",
           "plausible_mpp", "settle_mpp"]

MICRONS_AT_1X = 10.0  # mpp = MICRONS_AT_1X / objective power: 40x -> 0.25, 20x -> 0.5
ANISOTROPY_TOLERANCE = 0.01  # X and Y pixel sizes that differ by more than 1 % are anisotropic
MIN_PLAUSIBLE_MPP, MAX_PLAUSIBLE_MPP = 0.05, 20.0  # microscopy; screen defaults (72/96 dpi) and bogus tags
_MPP_RANGE = (MIN_PLAUSIBLE_MPP, MAX_PLAUSIBLE_MPP)  # fall outside; --mpp is held to the same range


def plausible_mpp(mpp: float | None) -> float | None:
    """``mpp`` if it is a microscopy resolution, else None."""
    return mpp if mpp is not None and _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1] else None


@dataclass(frozen=True)
class MppInfo:
    mpp: float | None  # um/px at level 0 (X when anisotropic)
    source: str  # where it came from, for the summary JSON
    warning: str | None = None  # set when a convention, not a measurement, gave the value
    anisotropic: tuple[float, float] | None = None  # (x, y) when they differ


def settle_mpp(mpp_x: float | None, mpp_y: float | None, source: str,
               objective_power: float | None = None, objective_source: str = "objective power") -> MppInfo:
    """Combine the recorded pixel sizes and objective power into one :class:`MppInfo`."""
    mpp_x, mpp_y = plausible_mpp(mpp_x), plausible_mpp(mpp_y)
    if mpp_x is not None:
        if mpp_y is not None and abs(mpp_x - mpp_y) > ANISOTROPY_TOLERANCE * max(mpp_x, mpp_y):
            return MppInfo(mpp_x, source, anisotropic=(mpp_x, mpp_y))
        return MppInfo(mpp_x, source)
    if objective_power and objective_power > 0:
        mpp = plausible_mpp(MICRONS_AT_1X / objective_power)
        if mpp is not None:
            return MppInfo(mpp, f"{objective_source} {objective_power:g}x",
                           warning=f"no pixel size recorded; assumed {mpp:g} um/px from the {objective_power:g}x "
                                   f"objective ({objective_source}) by the 40x = 0.25 um/px convention; "
                                   "pass --mpp if the scanner differs")
    return MppInfo(None, "none")
