"""Run a task's job over many inputs: discovery, skip-if-done, per-file errors, progress, a run summary.

Each task's record (:mod:`cdal_fast.tasks`) names the functions below that segment one input and
tell whether an input is done, with one signature for all tasks, so adding a task (or a distributed
runner calling these) needs no ``if task == ...`` chain. What to run with comes as one
:class:`cdal_fast.job.SegmentJob` (the settings) plus the sampler built from it.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..network.config import ModelConfig
from ..sampling.inference import PatchRunner
from ..sampling.sampler import SamplerLike
from ..tasks import get_task
from .dicom import is_dicom_folder
from .locks import describe_owner, try_lock
from .options import SegmentOptions
from .outputs import (
    finished_summary,
    is_small_image,
    output_names,
    required_outputs,
    slide_stem,
    write_summary,
)
from .pipeline import SampleStream, segment_slide
from .progress import TileProgress, TqdmProgress
from .radiographs_volumes import VOLUME_SUFFIXES, radiograph_done, segment_radiograph, segment_volume, volume_done
from .readers import DICOM_SUFFIXES, SLIDE_SUFFIXES
from .report import BatchReport, report_name
from .resume import changed_settings

if TYPE_CHECKING:
    from ..job import SegmentJob

RUN_SUMMARY = "run_summary.json"


def run_summary_name(shard_index: int = 0, shard_count: int = 1) -> str:
    """``run_summary.json``, or ``run_summary.shard-I-of-N.json`` for one job of a sharded run."""
    return RUN_SUMMARY if shard_count == 1 else f"run_summary.shard-{shard_index}-of-{shard_count}.json"


__all__ = ["RUN_SUMMARY", "run_summary_name", "find_inputs", "RunReport", "TaskRun", "InputOutcome",
           "finished_outcome", "run_input", "segment_all", "segment_slide_input", "slide_done",
           "segment_radiograph_input", "radiograph_input_done", "segment_volume_input", "volume_input_done"]


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
    html: BatchReport | None = field(default=None, repr=False)  # OUT/report.html, rewritten after each input

    @classmethod
    def for_batch(cls, out_dir: Path, files: list[Path], names: dict[Path, str], opts: SegmentOptions,
                  summary_name: str = RUN_SUMMARY) -> RunReport:
        """A report for a run over ``files``; with ``opts.report`` its HTML page (every input pending) is
        written now and after every outcome (``report.html``, or ``report.shard-I-of-N.html`` beside a
        shard's run summary)."""
        report = cls()
        if opts.report:
            report.html = BatchReport(out_dir, files, names, out_dir / report_name(summary_name))
            report.html.write()
        return report

    def finish(self, started: float, path: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Stop the clock (``started``: ``time.perf_counter()`` at the start) and write the run summary
        to ``path`` with ``extra`` runner details; every runner calls this however its run ends."""
        self.seconds = time.perf_counter() - started
        summary = self.to_dict() | (extra or {})
        write_summary(path, summary)
        if self.html is not None:
            self.html.write(final=True, seconds=self.seconds, interrupted=self.interrupted)
        return summary

    def add(self, outcome: InputOutcome, echo: Callable[[str], None] = print) -> None:
        """Record one input's outcome, echo its line (``skip``, ``FAIL``, ``warn``, ``done``) and
        rewrite the HTML report."""
        self._add(outcome, echo)
        if self.html is not None:
            self.html.record(outcome.path, outcome.status, outcome.error)
            self.html.write()

    def _add(self, outcome: InputOutcome, echo: Callable[[str], None]) -> None:
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
    """What every input of a job needs: the job, its sampler (and a patch runner over it), the decoding
    config (the job's threshold put in once), where it runs, and what the summaries record."""

    job: SegmentJob
    sampler: SamplerLike
    runner: PatchRunner | None  # None on a distributed driver that only plans, stitches and writes
    cfg: ModelConfig  # decodes with the job's threshold (SegmentJob.decoding_config)
    device: torch.device
    record: dict[str, Any]  # the summaries' "model" entry (SegmentJob.model_record)
    sample_stream: SampleStream | None = None  # slides only: where tiles are sampled (None = here, on `sampler`)

    @property
    def opts(self) -> SegmentOptions:
        return self.job.opts

    @property
    def dtype(self) -> torch.dtype:
        return self.job.sampler.torch_dtype

    @classmethod
    def local(cls, job: SegmentJob, sampler: SamplerLike, cfg: ModelConfig, device: torch.device,
              sample_stream: SampleStream | None = None) -> TaskRun:
        """A run that samples in this process (a patch runner over ``sampler`` for radiographs and volumes)."""
        runner = PatchRunner(sampler, device, job.sampler.torch_dtype, batch_size=job.opts.batch_size,
                             seed=job.opts.seed)
        return cls(job, sampler, runner, job.decoding_config(cfg), device, job.model_record(sampler, device),
                   sample_stream)


SegmentFn = Callable[[Path, Path, TaskRun, TileProgress], dict[str, Any]]
# (out_dir, input, options) -> the summary of the input's complete outputs, or None
DoneFn = Callable[[Path, Path, SegmentOptions], dict[str, Any] | None]


def segment_slide_input(path: Path, out_dir: Path, run: TaskRun, progress: TileProgress) -> dict[str, Any]:
    return segment_slide(path, out_dir, run.sampler, run.cfg, run.opts, run.device, run.dtype, run.record,
                         progress=progress, sample_stream=run.sample_stream)


def slide_done(out_dir: Path, path: Path, opts: SegmentOptions) -> dict[str, Any] | None:
    return finished_summary(out_dir, slide_stem(path), is_small_image(path), opts.pyramid_layout,
                            required_outputs(opts))


def segment_radiograph_input(path: Path, out_dir: Path, run: TaskRun, progress: TileProgress) -> dict[str, Any]:
    return segment_radiograph(path, out_dir, run.runner, run.cfg, run.record, progress=progress)


def radiograph_input_done(out_dir: Path, path: Path, opts: SegmentOptions) -> dict[str, Any] | None:
    return radiograph_done(out_dir, path)


def segment_volume_input(path: Path, out_dir: Path, run: TaskRun, progress: TileProgress) -> dict[str, Any]:
    return segment_volume(path, out_dir, run.runner, run.cfg, run.record, progress=progress)


def volume_input_done(out_dir: Path, path: Path, opts: SegmentOptions) -> dict[str, Any] | None:
    return volume_done(out_dir, path)


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


def finished_outcome(job: SegmentJob, out_dir: Path, path: Path) -> InputOutcome | None:
    """What a run does with an input whose outputs may already exist (``out_dir``: its folder).

    None: not complete (or ``--overwrite``), so run it. ``"skipped"``: complete, made with this
    job's settings. ``"failed"``: complete but made with other settings (:mod:`.resume`); the error
    names them, and the outputs stay as they are.
    """
    if job.opts.overwrite:
        return None
    summary = get_task(job.task).function("done")(out_dir, path, job.opts)
    if summary is None:  # not complete
        return None
    # radiograph and volume summaries record no tissue options, so only slides compare them
    changed = changed_settings(summary, job, whole_slide=not is_small_image(path), slide=path)
    if not changed:
        return InputOutcome(str(path), "skipped")
    return InputOutcome(str(path), "failed", error=(
        f"OutputsFromOtherSettings: {out_dir} already holds complete outputs made with other settings "
        f"({'; '.join(changed)}); rerun with --overwrite to replace them, or write to another --out"))


def run_input(path: Path, out_dir: Path, run: TaskRun, progress: TileProgress, name: str | None = None) -> InputOutcome:
    """The one per-input path of every runner (sequential, ``--shard``, ``--device`` lists, Ray).

    ``name`` is the input's output name (``outputs.output_names``; default: its stem): outputs go to
    ``out_dir / name``'s folder. Skip if done with this job's settings (:func:`finished_outcome`;
    done with others: ``"failed"``); otherwise take the input's lock (``locks.py``; owned by another
    live run: ``"locked"``), re-check completion under it and run. Any exception while
    processing the input is caught and returned as ``"failed"`` with its traceback.
    """
    segment_fn = get_task(run.job.task).function("segment")
    name = name or slide_stem(path)
    sub_out = out_dir / Path(name).parent
    if (finished := finished_outcome(run.job, sub_out, path)) is not None:
        return finished
    sub_out.mkdir(parents=True, exist_ok=True)
    lock = try_lock(out_dir, name)
    if lock is None:
        return InputOutcome(str(path), "locked", error=describe_owner(out_dir, name))
    with lock:
        if (finished := finished_outcome(run.job, sub_out, path)) is not None:
            return finished  # finished by another run meanwhile
        try:
            return InputOutcome(str(path), "done", segment_fn(path, sub_out, run, progress))
        except Exception as exc:  # noqa: BLE001 - one bad input must never end the batch
            return InputOutcome(str(path), "failed", error=error_text(exc), traceback=traceback.format_exc())


def segment_all(files: list[Path], out_dir: Path, run: TaskRun, echo=print, show_progress: bool = True,
                names: dict[Path, str] | None = None, summary_name: str = RUN_SUMMARY) -> RunReport:
    """Segment ``files`` with ``run`` (its job's task: slides/images, radiographs or volumes).

    ``names`` are the output names (``outputs.output_names``; default: each file's stem, checked for
    collisions before anything runs). Each input goes through :func:`run_input`: worked under its lock
    (``locks.py``), so concurrent runs on one ``out_dir`` share the inputs out; any exception while
    processing one input is recorded for it (message and traceback) and the batch goes on. The run
    summary is written at the end however the loop ends (also on Ctrl-C, with ``"interrupted": true``).
    ``summary_name``: concurrent jobs over one ``out_dir`` (``--shard``) each need their own run summary.
    """
    if names is None:
        names = output_names(files)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = RunReport.for_batch(out_dir, files, names, run.opts, summary_name)
    t0 = time.perf_counter()
    try:
        for n, f in enumerate(files, start=1):
            bar = TqdmProgress(f.name, n, len(files), enabled=show_progress)
            try:
                outcome = run_input(f, out_dir, run, bar, names[f])
            finally:
                bar.close()
            report.add(outcome, echo)
    except BaseException:
        report.interrupted = True
        raise
    finally:
        report.finish(t0, out_dir / summary_name)
    return report
