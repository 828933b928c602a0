"""Resume only what this run would make: complete outputs made with other settings are not "done".

A rerun into the same ``--out`` skips an input whose summary says complete only when the settings
that shape the outputs, read back from that summary, equal this job's; an input finished under
other settings is reported as a failure naming what differs (``--overwrite`` redoes it), never
skipped (the folder would silently hold results of settings nobody asked for) and never
overwritten unasked.

Compared (each only where the old summary recorded it, so summaries of older versions still
resume): the weights' SHA-256 (their path when the weights are unverified and carry no hash),
steps, votes, TTA and the decision threshold (the summary's ``model``), the seed, and for slides the
options that change which tiles are sampled, what they look like to the model (stain normalisation
and its reference) or how they are blended, labelled and measured (the tissue options only for
whole slides: PNG/JPEG tiles run no tissue detection; the stain, its vectors and ring width where
stains are measured; the positivity thresholds and compartment with H-DAB). Not compared: what cannot
change the outputs (batch size, loader workers, device, progress) and what only adds files
(``--save-prob`` etc., which the completion check itself requires). The backend and dtype are
deliberately not compared: a rerun on another device or precision resumes what is done (bfloat16
differs from float32 by more than the backends' parity tolerance; the summary records what ran).
The ROI is compared by its resolved path and by the SHA-256 of the slide's ROI file (the file itself,
or the slide's file in an ROI folder): an ROI edited in place is a changed setting.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..hashing import file_sha256
from .outputs import slide_stem
from .readers import SlideError
from .roi import roi_file

if TYPE_CHECKING:
    from ..job import SegmentJob

__all__ = ["MODEL_KEYS", "OPTION_KEYS", "TISSUE_KEYS", "NUCLEI_KEYS", "STAIN_KEYS", "POSITIVITY_KEYS",
           "NORMALISE_KEYS", "compared_option_keys", "run_settings", "recorded_settings", "changed_settings"]

MODEL_KEYS = ("sha256", "steps", "votes", "tta", "threshold")  # the job's (SegmentJob.resume_settings)
OPTION_KEYS = ("seed", "tile_overlap", "tiling", "mpp", "roi", "stain_normalise")
NORMALISE_KEYS = ("stain_reference",)  # compared when tiles are stain-normalised
TISSUE_KEYS = ("tissue", "tissue_threshold", "tissue_min_area_um2")  # compared for whole slides
NUCLEI_KEYS = ("nuclei_threshold", "nuclei_h_um", "nuclei_min_area_um2", "stain")  # compared when nuclei are made
STAIN_KEYS = ("stain_vectors", "cell_ring_um")  # compared when nuclei carry stain measurements
POSITIVITY_KEYS = ("positivity_thresholds", "positivity_compartment")  # compared for H-DAB (IHC classes)
ALL_OPTION_KEYS = OPTION_KEYS + NORMALISE_KEYS + TISSUE_KEYS + NUCLEI_KEYS + STAIN_KEYS + POSITIVITY_KEYS


def _plain(value: Any) -> Any:
    """The value as the summary's JSON holds it (tuples become lists, and so on)."""
    return json.loads(json.dumps(value))


def _model_settings(model: dict[str, Any]) -> dict[str, Any]:
    settings = {k: model[k] for k in MODEL_KEYS if k in model}
    if not model.get("sha256") and "weights" in model:  # unverified weights: no hash to tell them apart
        settings["weights"] = model["weights"]
    return settings


def _roi_sha256(roi: str, slide: Path) -> str | None:
    """SHA-256 of ``slide``'s ROI file now; None when it is missing or unreadable, which differs from
    any recorded hash: outputs made with an ROI this run cannot find are not taken as done."""
    try:
        return file_sha256(roi_file(Path(roi), slide_stem(slide)))
    except (SlideError, OSError):
        return None


def compared_option_keys(opts: Any, whole_slide: bool = True) -> tuple[str, ...]:
    """The options that shape this run's outputs: the stain settings only where they act (stain
    measurements with nuclei, positivity with H-DAB, the reference with normalisation)."""
    keys = OPTION_KEYS + (NORMALISE_KEYS if opts.stain_normalise else ()) + (TISSUE_KEYS if whole_slide else ())
    if opts.nuclei:
        keys += NUCLEI_KEYS
        if opts.stain != "none":
            keys += STAIN_KEYS
        if opts.stain == "h-dab":
            keys += POSITIVITY_KEYS
    return keys


def run_settings(job: SegmentJob, whole_slide: bool = True, slide: Path | None = None) -> dict[str, Any]:
    """This job's output-shaping settings: the model and sampler's, plus the slide options, plus the
    SHA-256 of ``slide``'s ROI file when there is an ROI and the input is given."""
    opts = job.opts
    options = asdict(opts)
    keys = compared_option_keys(opts, whole_slide)
    settings = job.resume_settings()
    settings.update({k: options[k] for k in keys})
    if opts.roi and slide is not None:
        settings["roi_sha256"] = _roi_sha256(opts.roi, slide)
    return _plain(settings)


def recorded_settings(summary: dict[str, Any]) -> dict[str, Any]:
    """The same settings as an input's summary recorded them (radiographs and volumes keep no
    ``options``: their seed, steps and votes sit at the top level)."""
    model = summary.get("model") or {}
    options = summary.get("options") or {}
    settings = _model_settings(model)
    settings.update({k: options[k] for k in ALL_OPTION_KEYS if k in options})
    if options and "tiling" not in options:  # summaries from before shifted tiling existed blended their tiles
        settings["tiling"] = "blend"
    # every task's summary keeps the effective steps, votes and seed at its top level (the model
    # info names votes only in newer runs; radiographs and volumes record no options)
    settings.update({k: summary[k] for k in ("steps", "votes", "seed") if k in summary})
    roi = summary.get("roi")
    if isinstance(roi, dict) and roi.get("sha256"):  # slides record the ROI they used
        settings["roi_sha256"] = roi["sha256"]
    return settings


def changed_settings(summary: dict[str, Any], job: SegmentJob, whole_slide: bool = True,
                     slide: Path | None = None) -> list[str]:
    """``name recorded -> this run`` for every compared setting that differs (empty: resume), given
    the complete summary the completion check read. ``whole_slide``: False for PNG/JPEG tiles,
    which run no tissue detection; ``slide``: the input, whose ROI file's contents are compared."""
    before = recorded_settings(summary)
    # hash the ROI file only when the summary recorded one to compare with (it may be a large mask)
    now = run_settings(job, whole_slide, slide if "roi_sha256" in before else None)
    return [f"{k} {before[k]!r} -> {now[k]!r}" for k in now if k in before and before[k] != now[k]]
