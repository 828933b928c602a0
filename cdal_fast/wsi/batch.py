"""Run a task's job over many inputs: discovery, skip-if-done, per-file errors, progress, a run summary.

Every task is one row of :data:`TASKS`: ``name -> (segment_fn, done_fn)`` with one signature for all,
so adding a task (or a distributed runner calling these) needs no ``if task == ...`` chain.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..network.config import ModelConfig
from ..sampling.inference import PatchRunner
from ..sampling.sampler import SamplerLike
from .dicom import is_dicom_folder
from .locks import describe_owner, try_lock
from .outputs import (
    finished_summary,
    is_small_image,
    output_names,
    required_outputs,
    slide_stem,
    write_summary,
)
from .pipeline import SampleStream, SegmentOptions, decoding_config, segment_slide
from .progress import TileProgress, TqdmProgress
from .radiographs_volumes import VOLUME_SUFFIXES, radiograph_done, segment_radiograph, segment_volume, volume_done
from .readers import DICOM_SUFFIXES, SLIDE_SUFFIXES
from .resume import changed_settings

RUN_SUMMARY = "run_summary.json"


def run_summary_name(shard_index: int = 0, shard_count: int = 1) -> str:
    """``run_summary.json``, or ``run_summary.shard-I-of-N.json`` for one job of a sharded run."""
    return RUN_SUMMARY if shard_count == 1 else f"run_summary.shard-{shard_index}-of-{shard_count}.json"


__all__ = ["RUN_SUMMARY", "run_summary_name", "find_inputs", "RunReport", "TaskRun", "TASKS", "InputOutcome",
           "finished_outcome", "run_input", "segment_all"]


def _listed(f: Path) -> bool:
    """A scanned entry with a slide name is an input unless it is a DICOM instance's sibling folder:
    regular files, and also broken or looping links and plain folders named like slides, so that
    they are reported as failures instead of silently skipped."""
    return f.is_file() or f.is_symlink() or (f.is_dir() and not is_dicom_folder(f))


def find_inputs(inputs: list[Path], recursive: bool = False, pattern: str | None = None) -> list[Path]:
    """Files named directly, plus slide-like entries inside named folders (sorted, de-duplicated).

    A DICOM WSI is a folder of instances: a named folder holding DICOM files is one input, and a
    ``.dcm`` file found while scanning stands for its folder (so a slide's levels are one input).
    """
    found: list[Path] = []
    for p in inputs:
        if p.is_dir() and is_dicom_folder(p) and not any(
                f.name.lower().endswith(SLIDE_SUFFIXES) and not f.name.lower().endswith(DICOM_SUFFIXES)
                for f in p.iterdir()):
            found.append(p)  # a slide's DICOM instances (suffix or not); folders with other slides are scanned
        elif p.is_dir():
            it = (p.rglob(pattern or "*") if recursive else p.glob(pattern or "*"))
            found += [f.parent if f.name.lower().endswith(DICOM_SUFFIXES) else f for f in it
                      if _listed(f) and f.name.lower().endswith(SLIDE_SUFFIXES + VOLUME_SUFFIXES)
                      and not f.name.startswith(".")]
        else:
            found.append(p)
    seen, out = set(), []
    for f in sorted(found):
        try:
            key = f.resolve()
        except (OSError, RuntimeError):  # a symlink loop: reported when it is opened
            key = f.absolute()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


@dataclass
class Failure:
    """One input that could not be processed: what went wrong, where (the traceback), for the summary."""

    file: str
    error: str  # "ExceptionType: message"
    traceback: str


@dataclass
class RunReport:
    done: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)  # owned by another live run: left to it
    failed: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    def finish(self, started: float, path: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Stop the clock (``started``: ``time.perf_counter()`` at the start) and write the run summary
        to ``path`` with ``extra`` runner details; every runner calls this however its run ends."""
        self.seconds = time.perf_counter() - started
        summary = self.to_dict() | (extra or {})
        write_summary(path, summary)
        return summary

    def add(self, outcome: InputOutcome, echo: Callable[[str], None] = print) -> None:
        """Record one input's outcome and echo its line (``skip``, ``FAIL``, ``warn``, ``done``)."""
        f = outcome.path
        if outcome.status == "skipped":
            self.skipped.append(f)
            echo(f"skip  {f} (already done; --overwrite to redo)")
        elif outcome.status == "locked":
            self.locked.append(f)
            echo(f"skip  {f} (being processed by {outcome.error})")
        elif outcome.status == "failed":
            self.failed.append(Failure(f, outcome.error, outcome.traceback))
            echo(f"FAIL  {f}: {outcome.error}")
        else:
            summary = outcome.summary or {}
            self.done.append(summary)
            for warning in summary.get("warnings") or []:
                echo(f"warn  {f}: {warning}")
            detail = (f"objects {summary['object_fraction']:.3f}, " if "object_fraction" in summary else "")
            if "nuclei_count" in summary:
                detail += f"{summary['nuclei_count']} nuclei, "
            echo(f"done  {f}: {detail}{summary.get('seconds', 0.0):.1f} s")

    def to_dict(self) -> dict[str, Any]:
        tiles = sum(d.get("tiles_sampled", 0) for d in self.done)
        return {"processed": len(self.done), "skipped_complete": self.skipped, "skipped_locked": self.locked,
                "failed": [asdict(f) for f in self.failed], "seconds": self.seconds, "interrupted": self.interrupted,
                "tiles": tiles, "tiles_per_second": tiles / self.seconds if self.seconds else 0.0}


@dataclass
class TaskRun:
    """What every task's job needs besides the input: the sampler (and a patch runner over it), config, options."""

    sampler: SamplerLike
    runner: PatchRunner | None  # None on a Ray driver that only plans, stitches and writes
    cfg: ModelConfig
    opts: SegmentOptions
    device: torch.device
    dtype: torch.dtype
    model_info: dict[str, Any]
    sample_stream: SampleStream | None = None  # slides only: where tiles are sampled (None = here, on `sampler`)

    def __post_init__(self) -> None:
        self.cfg = decoding_config(self.cfg, self.opts)  # radiographs and volumes decode with run.cfg too


SegmentFn = Callable[[Path, Path, TaskRun, TileProgress], dict[str, Any]]
# (out_dir, input, options) -> the summary of the input's complete outputs, or None
DoneFn = Callable[[Path, Path, SegmentOptions], dict[str, Any] | None]


def _segment_slide(path: Path, out_dir: Path, run: TaskRun, progress: TileProgress) -> dict[str, Any]:
    return segment_slide(path, out_dir, run.sampler, run.cfg, run.opts, run.device, run.dtype, run.model_info,
                         progress=progress, sample_stream=run.sample_stream)


def _slide_done(out_dir: Path, path: Path, opts: SegmentOptions) -> dict[str, Any] | None:
    return finished_summary(out_dir, slide_stem(path), is_small_image(path), opts.pyramid_layout,
                            required_outputs(opts))


def _segment_radiograph(path: Path, out_dir: Path, run: TaskRun, progress: TileProgress) -> dict[str, Any]:
    return segment_radiograph(path, out_dir, run.runner, run.cfg, run.model_info, progress=progress)


def _segment_volume(path: Path, out_dir: Path, run: TaskRun, progress: TileProgress) -> dict[str, Any]:
    return segment_volume(path, out_dir, run.runner, run.cfg, run.model_info, progress=progress)


TASKS: dict[str, tuple[SegmentFn, DoneFn]] = {
    "monuseg": (_segment_slide, _slide_done),
    "cxr": (_segment_radiograph, lambda out_dir, path, _opts: radiograph_done(out_dir, path)),
    "hippocampus": (_segment_volume, lambda out_dir, path, _opts: volume_done(out_dir, path)),
}


def error_text(exc: BaseException) -> str:
    """``Type: message`` (a bare ``str(exc)`` is empty for e.g. ``ZeroDivisionError()`` or ``KeyError``)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class InputOutcome:
    """What happened to one input (picklable: Ray actors return it to the driver)."""

    path: str
    status: str  # "done", "skipped" (already complete), "locked" (another live run owns it) or "failed"
    summary: dict[str, Any] | None = None
    error: str = ""  # "failed": "Type: message"; "locked": who owns the input
    traceback: str = ""


def finished_outcome(task: str, out_dir: Path, path: Path, opts: SegmentOptions,
                     model_info: dict[str, Any]) -> InputOutcome | None:
    """What a run does with an input whose outputs may already exist (``out_dir``: its folder).

    None: not complete (or ``--overwrite``), so run it. ``"skipped"``: complete, made with this
    run's settings. ``"failed"``: complete but made with other settings (:mod:`.resume`); the error
    names them, and the outputs stay as they are.
    """
    if opts.overwrite:
        return None
    summary = TASKS[task][1](out_dir, path, opts)
    if summary is None:  # not complete
        return None
    # radiograph and volume summaries record no tissue options, so only slides compare them
    changed = changed_settings(summary, model_info, opts, whole_slide=not is_small_image(path), slide=path)
    if not changed:
        return InputOutcome(str(path), "skipped")
    return InputOutcome(str(path), "failed", error=(
        f"OutputsFromOtherSettings: {out_dir} already holds complete outputs made with other settings "
        f"({'; '.join(changed)}); rerun with --overwrite to replace them, or write to another --out"))


def input_options(opts: SegmentOptions, cfg: ModelConfig) -> SegmentOptions:
    """The options one input runs under: no nucleus objects from a multi-class model (none are expected)."""
    return replace(opts, nuclei=False) if opts.nuclei and cfg.multiclass else opts


def run_input(path: Path, out_dir: Path, run: TaskRun, progress: TileProgress, task: str = "monuseg",
              name: str | None = None) -> InputOutcome:
    """The one per-input path of every runner (sequential, ``--shard``, ``--device`` lists, Ray).

    ``name`` is the input's output name (``outputs.output_names``; default: its stem): outputs go to
    ``out_dir / name``'s folder. Skip if done with this run's settings (:func:`finished_outcome`;
    done with others: ``"failed"``); otherwise take the input's lock (``locks.py``; owned by another
    live run: ``"locked"``), re-check completion under it and run. Any exception while
    processing the input is caught and returned as ``"failed"`` with its traceback.
    """
    segment_fn = TASKS[task][0]
    opts = input_options(run.opts, run.cfg)
    if opts is not run.opts:
        run = replace(run, opts=opts)
    name = name or slide_stem(path)
    sub_out = out_dir / Path(name).parent
    if (finished := finished_outcome(task, sub_out, path, opts, run.model_info)) is not None:
        return finished
    sub_out.mkdir(parents=True, exist_ok=True)
    lock = try_lock(out_dir, name)
    if lock is None:
        return InputOutcome(str(path), "locked", error=describe_owner(out_dir, name))
    with lock:
        if (finished := finished_outcome(task, sub_out, path, opts, run.model_info)) is not None:
            return finished  # finished by another run meanwhile
        try:
            return InputOutcome(str(path), "done", segment_fn(path, sub_out, run, progress))
        except Exception as exc:  # noqa: BLE001 - one bad input must never end the batch
            return InputOutcome(str(path), "failed", error=error_text(exc), traceback=traceback.format_exc())


def segment_all(files: list[Path], out_dir: Path, sampler: SamplerLike, cfg: ModelConfig, opts: SegmentOptions,
                device: torch.device, dtype: torch.dtype, model_info: dict, echo=print,
                show_progress: bool = True, task: str = "monuseg", names: dict[Path, str] | None = None,
                summary_name: str = RUN_SUMMARY) -> RunReport:
    """Segment ``files`` for ``task``: slides/images (monuseg), radiographs (cxr), volumes (hippocampus).

    ``names`` are the output names (``outputs.output_names``; default: each file's stem, checked for
    collisions before anything runs). Each input goes through :func:`run_input`: worked under its lock
    (``locks.py``), so concurrent runs on one ``out_dir`` share the inputs out; any exception while
    processing one input is recorded for it (message and traceback) and the batch goes on. The run
    summary is written at the end however the loop ends (also on Ctrl-C, with ``"interrupted": true``).
    ``summary_name``: concurrent jobs over one ``out_dir`` (``--shard``) each need their own run summary.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if names is None:
        names = output_names(files)
    opts = input_options(opts, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = RunReport()
    t0 = time.perf_counter()
    runner = PatchRunner(sampler, device, dtype, batch_size=max(opts.batch_size, 1), seed=opts.seed)
    run = TaskRun(sampler, runner, cfg, opts, device, dtype, model_info)
    try:
        for n, f in enumerate(files, start=1):
            bar = TqdmProgress(f.name, n, len(files), enabled=show_progress)
            try:
                outcome = run_input(f, out_dir, run, bar, task, names[f])
            finally:
                bar.close()
            report.add(outcome, echo)
    except BaseException:
        report.interrupted = True
        raise
    finally:
        report.finish(t0, out_dir / summary_name)
    return report
