"""Resume only what this run would make: complete outputs made with other settings are not "done".

A rerun into the same ``--out`` skips every input whose summary says complete. Before this check, a
rerun with, say, ``--threshold 0.3`` skipped inputs finished at 0.4 and reported success, so the
folder silently held results of settings nobody asked for. Now the settings that shape the outputs
are read back from the input's summary and compared with this run's; an input finished under other
settings is reported as a failure naming what differs (``--overwrite`` redoes it), never skipped
and never overwritten unasked.

Compared (each only where the old summary recorded it, so summaries of older versions still
resume): the weights' SHA-256, steps, votes, TTA and the decision threshold (the summary's
``model``), the seed, and for slides the options that change which tiles are sampled or how they are
blended and labelled. Not compared: what cannot change the outputs (batch size, loader workers,
device, progress) and what only adds files (``--save-prob`` etc., which the completion check
itself requires). The backend and dtype are not compared either: backends agree to within their
tested tolerance, and the summary records which one ran.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .pipeline import SegmentOptions

__all__ = ["MODEL_KEYS", "OPTION_KEYS", "NUCLEI_KEYS", "run_settings", "recorded_settings", "changed_settings"]

MODEL_KEYS = ("sha256", "steps", "votes", "tta", "threshold")  # from the run's model info
OPTION_KEYS = ("seed", "tile_overlap", "mpp", "tissue", "tissue_threshold", "tissue_min_area_um2", "roi")
NUCLEI_KEYS = ("nuclei_threshold", "nuclei_h_um", "nuclei_min_area_um2")  # compared when nuclei are made


def _plain(value: Any) -> Any:
    """The value as the summary's JSON holds it (tuples become lists, and so on)."""
    return json.loads(json.dumps(value))


def run_settings(model_info: dict[str, Any], opts: SegmentOptions) -> dict[str, Any]:
    """This run's output-shaping settings: the model info the CLI records, plus the options."""
    options = asdict(opts)
    keys = OPTION_KEYS + (NUCLEI_KEYS if opts.nuclei else ())
    settings = {k: model_info[k] for k in MODEL_KEYS if k in model_info}
    settings.update({k: options[k] for k in keys})
    return _plain(settings)


def recorded_settings(summary: dict[str, Any]) -> dict[str, Any]:
    """The same settings as an input's summary recorded them (radiographs and volumes keep no
    ``options``: their seed, steps and votes sit at the top level)."""
    model = summary.get("model") or {}
    options = summary.get("options") or {}
    settings = {k: model[k] for k in MODEL_KEYS if k in model}
    for k in ("steps", "votes"):  # the effective values; the model info only names them in newer runs
        if k in summary:
            settings[k] = summary[k]
    settings.update({k: options[k] for k in OPTION_KEYS + NUCLEI_KEYS if k in options})
    if "seed" in summary:
        settings["seed"] = summary["seed"]
    return settings


def changed_settings(summary_path: Path, model_info: dict[str, Any], opts: SegmentOptions) -> list[str]:
    """``name recorded -> this run`` for every compared setting that differs (empty: resume)."""
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError):
        return []  # the completion check already read it; nothing recorded means nothing to compare
    before, now = recorded_settings(summary), run_settings(model_info, opts)
    return [f"{k} {before[k]!r} -> {now[k]!r}" for k in now if k in before and before[k] != now[k]]
