"""Range-checked types for the CLI's numeric options, and the reverse-step (T) policy.

Every numeric option is checked by click before any work starts, so ``--votes 0`` (NaN
probabilities, empty masks, exit 0), ``--steps 0`` or ``--batch-size 0`` (tracebacks) end in one
usage error naming the option and its allowed range. The upper bounds are the model limits of
:mod:`cdal_fast.network.config_limits` or generous sanity caps; raise the constants here to lift them.
"""

from __future__ import annotations

import math
from typing import Any

import click

from .network.config_limits import INT_LIMITS, MAX_STEPS, MAX_VOTES
from .wsi.mpp import MAX_PLAUSIBLE_MPP, MIN_PLAUSIBLE_MPP
from .wsi.options import MAX_CELL_RING_UM

__all__ = ["STEPS", "VOTES", "BATCH", "WORKERS", "SEED", "COUNT", "MINUTES", "MPP", "MAX_PIXELS", "OVERLAP",
           "TILE_SIZE", "PROBABILITY", "MARKER_H_UM", "AREA_UM2", "ALLOW_UNTRAINED_STEPS_HELP", "TTA_OPTION",
           "RING_UM", "OD_THRESHOLDS", "check_steps"]

MAX_BATCH = 4096  # tiles per sampler call; far beyond any GPU's memory for the shipped models
MAX_WORKERS = 64  # tile-reading processes
MAX_SEED = 2**63 - 1  # torch.Generator seeds are 64-bit
MAX_COUNT = 10**9  # iterations, image limits
MAX_MARKER_H_UM = 100.0  # far above any nucleus radius: no split at all
MAX_AREA_UM2 = 1e6  # 1 mm^2: larger than any object worth keeping


class FiniteFloatRange(click.FloatRange):
    """A ``click.FloatRange`` that also refuses NaN and infinity (NaN passes every comparison)."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number.", param, ctx)
        return rv


STEPS = click.IntRange(1, MAX_STEPS)
VOTES = click.IntRange(1, MAX_VOTES)
BATCH = click.IntRange(1, MAX_BATCH)
WORKERS = click.IntRange(0, MAX_WORKERS)
SEED = click.IntRange(0, MAX_SEED)
COUNT = click.IntRange(1, MAX_COUNT)
MINUTES = FiniteFloatRange(0, min_open=True)
MPP = FiniteFloatRange(MIN_PLAUSIBLE_MPP, MAX_PLAUSIBLE_MPP)  # the plausibility range applied to metadata
MAX_PIXELS = FiniteFloatRange(1, min_open=False)  # --max-pixels: working pixels per slide
OVERLAP = click.IntRange(0, INT_LIMITS["image_size"][1])  # and below the model's tile, checked later
TILE_SIZE = click.IntRange(*INT_LIMITS["image_size"])
PROBABILITY = FiniteFloatRange(0, 1, min_open=True, max_open=True)  # mask and nucleus thresholds
MARKER_H_UM = FiniteFloatRange(0, MAX_MARKER_H_UM, min_open=True)
AREA_UM2 = FiniteFloatRange(0, MAX_AREA_UM2)
RING_UM = FiniteFloatRange(0, MAX_CELL_RING_UM)  # --cell-ring: width of the cytoplasm ring


class ThresholdTriple(click.ParamType):
    """Three increasing positive optical densities, ``A,B,C`` (``--positivity-thresholds 0.2,0.4,0.6``)."""

    name = "OD,OD,OD"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            parts = tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not three comma-separated numbers (e.g. 0.2,0.4,0.6).", param, ctx)
        if len(parts) != 3 or not all(math.isfinite(v) for v in parts) or not 0 < parts[0] < parts[1] < parts[2]:
            self.fail(f"{value!r}: need three increasing positive optical densities (e.g. 0.2,0.4,0.6).", param, ctx)
        return parts


OD_THRESHOLDS = ThresholdTriple()

ALLOW_UNTRAINED_STEPS_HELP = (
    "Allow --steps different from the T the model was trained with. The schedule then differs from "
    "the one the model learned, so masks are not those the model was validated for; the output "
    "records untrained_steps: true."
)


# --tta/--no-tta: None (neither given) means the model config's own ``tta`` default.
TTA_OPTION = click.option(
    "--tta/--no-tta", default=None,
    help="Test-time augmentation: vote v sees the tile under the v-th of the 8 flips/rotations (mapped back "
         "before averaging; same number of forwards). Default: the model's own setting (its JSON config).")


# --threshold: None (not given) means the model config's own ``threshold`` (chosen on validation).
THRESHOLD_OPTION = click.option(
    "--threshold", type=PROBABILITY, default=None,
    help="Binary models: a pixel is object where the vote-mean probability is >= this. Default: the model's own "
         "(its JSON config and model card; 0.5 unless a threshold was chosen on validation).")


def check_steps(steps: int | None, trained: int, allow: bool) -> bool:
    """Refuse ``--steps`` other than the trained T unless allowed; True when T is untrained.

    cDAL's generator is trained for one fixed schedule of T reverse steps: another T silently
    runs a schedule the model never saw, so it needs the explicit flag.
    """
    if steps is None or steps == trained:
        return False
    if not allow:
        raise click.BadParameter(
            f"{steps} differs from the {trained} reverse steps this model was trained with; pass "
            "--allow-untrained-steps to run an untrained schedule anyway", param_hint="--steps")
    return True
