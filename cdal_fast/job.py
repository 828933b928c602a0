"""The job layer: one frozen, validated :class:`SegmentJob` resolved once from what the user asked.

``cdal-fast segment`` used to decide job policy inside the CLI (the batch size by device, the tile
overlap and its range, nuclei for multi-class models, the TTA and threshold defaults, the untrained
steps check) and to carry the result in three shapes (options, an untyped ``info`` dict, a worker
spec). Here the CLI hands over the raw request (:class:`SegmentRequest`), :func:`resolve_segment_job`
applies every default and check once, and the one resulting object travels to every runner: the
single process, ``--shard`` jobs, the per-device workers and the Ray actors. It also says

* what every summary records about the model and sampler (:meth:`SegmentJob.model_record`),
* what a rerun compares to decide that outputs were made with these settings
  (:meth:`SegmentJob.resume_settings`), and
* how samplers are built (:meth:`SegmentJob.build_sampler`: the one place a job builds one).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .network.config import ModelConfig
from .nuclei.stain import StainProfile
from .runtime.backends import AUTO, BACKEND_CHOICES, build_sampler, check_backend
from .runtime.onnx_tensorrt import OnnxSampler
from .sampling.dihedral import vote_codes
from .sampling.inference import DTYPES
from .sampling.sampler import SamplerLike
from .tasks import get_task
from .weights import ModelBundle
from .wsi.options import OptionsError, SegmentOptions

__all__ = ["AUTO", "BACKEND_CHOICES", "JobError", "ModelRef", "SamplerSettings", "SegmentRequest", "SegmentJob",
           "resolve_segment_job", "backend_used", "GPU_BATCH", "CPU_BATCH", "OVERLAP_FRACTION", "DEFAULT_TILING",
           "SHIFTED_CONTEXT", "default_tiling", "vote_frames"]

GPU_BATCH = 8  # tiles per sampler call on a GPU (also the TensorRT engine's largest batch)
CPU_BATCH = 1  # on a CPU bigger batches only cost memory
OVERLAP_FRACTION = 4  # default tile overlap with blended tiling: a quarter of the tile
SHIFTED_CONTEXT = 0  # default tile context with shifted tiling: none (the votes' grids hide the borders)
# Default tiling by device, for models with several votes (one-vote models always blend). On a CPU, shifted
# tiling met the accuracy rule at the cost per area of a grid without overlap (docs/benchmarks.md); the
# GPU paths were measured with blended tiles, and a one-vote tile fills a GPU batch 1/V as well.
DEFAULT_TILING = {"cpu": "shifted", "cuda": "blend"}


def vote_frames(votes: int, tta: bool) -> tuple[int, ...]:
    """Shifted tiling: the dihedral code of each vote's grid (TTA's codes, or the identity for every vote)."""
    return tuple(vote_codes(votes, True)) if tta else (0,) * votes


class JobError(ValueError):
    """A request that cannot become a job; ``param`` names the CLI option at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ModelRef:
    """Which weights a job runs (as asked, and as loaded: file, hash, whether it was verified)."""

    weights: str | None  # --weights as given; None: the shipped ``model``
    model: str | None  # the shipped model asked for (None: the task's default)
    path: str
    sha256: str  # "" when unverified
    content_sha256: str  # over all tensor files: the key of exported-graph caches
    verified: bool
    preset: str
    trained_steps: int

    @classmethod
    def of(cls, bundle: ModelBundle, weights: str | Path | None, model: str | None = None) -> ModelRef:
        return cls(None if weights is None else str(weights), model, str(bundle.path), bundle.sha256,
                   bundle.content_sha256, bundle.verified, bundle.config.name, bundle.config.num_steps)


@dataclass(frozen=True)
class SamplerSettings:
    """How the sampler is built and run: every value effective (defaults applied)."""

    backend: str  # as asked; "auto" resolves where the sampler is built
    dtype: str  # a key of :data:`cdal_fast.sampling.inference.DTYPES`
    device: str  # "cpu", "cuda", "cuda:1"; "auto" for workers that resolve it where they run
    steps: int
    votes: int
    tta: bool
    untrained_steps: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class SegmentRequest:
    """What the user asked for ``segment``, as parsed: None means "the default"."""

    task: str = "monuseg"
    model: str | None = None
    weights: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    backend: str = AUTO
    batch_size: int | None = None
    steps: int | None = None
    allow_untrained_steps: bool = False
    votes: int | None = None
    tta: bool | None = None
    threshold: float | None = None
    tile_overlap: int | None = None
    tiling: str | None = None  # None: default_tiling() (the device's default, or blend)
    nuclei: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # the other SegmentOptions fields, as given


@dataclass(frozen=True)
class SegmentJob:
    """Everything a runner needs besides the inputs (picklable: sent to every worker and actor)."""

    task: str
    model: ModelRef
    sampler: SamplerSettings
    threshold: float | None  # the decision threshold of binary masks; None for multi-class models
    opts: SegmentOptions
    threads: int | None = None  # torch intra-op threads (CPU workers sharing a machine)
    extra_record: tuple[tuple[str, Any], ...] = ()  # runner facts for the summaries (e.g. the Ray address)

    @classmethod
    def of(cls, model: ModelBundle | ModelConfig, opts: SegmentOptions, *, task: str = "monuseg",
           weights: str | None = None, backend: str = "eager", dtype: str = "float32", device: str = "cpu",
           steps: int | None = None, votes: int | None = None, tta: bool | None = None,
           threshold: float | None = None) -> SegmentJob:
        """A job for ``model`` (loaded weights, or a bare config) with ``opts`` exactly as given: for
        Python callers, tests and benches that set every option themselves (no CLI defaults applied)."""
        if isinstance(model, ModelBundle):
            cfg, ref = model.config, ModelRef.of(model, weights)
        else:
            cfg, ref = model, ModelRef(weights, None, weights or "", "", "", False, model.name, model.num_steps)
        sampler = _settings(cfg, backend, dtype, device, steps, votes, tta)
        _check_tiling(opts, sampler)
        decided = None if cfg.multiclass else (cfg.threshold if threshold is None else threshold)
        return cls(task, ref, sampler, decided, replace(opts, nuclei=opts.nuclei and not cfg.multiclass))

    @property
    def tiled(self) -> bool:
        return get_task(self.task).tiled

    def decoding_config(self, cfg: ModelConfig) -> ModelConfig:
        """``cfg`` with the job's threshold: every stage that turns probabilities into masks reads it there."""
        if self.threshold is None or self.threshold == cfg.threshold:
            return cfg
        return replace(cfg, threshold=self.threshold)

    def on_device(self, device: str, threads: int | None = None) -> SegmentJob:
        """The same job for one worker on ``device`` (with its share of CPU threads)."""
        return replace(self, sampler=replace(self.sampler, device=device), threads=threads)

    def with_record(self, **facts: Any) -> SegmentJob:
        return replace(self, extra_record=(*self.extra_record, *facts.items()))

    def check_backend(self, device: torch.device | str) -> None:
        """Fail now (:class:`~cdal_fast.runtime.requires.BackendError`) when the job's backend cannot run
        on ``device`` here: before any input is listed, read or exported for."""
        check_backend(self.sampler.backend, device)

    def build_sampler(self, generator: torch.nn.Module, device: torch.device) -> SamplerLike:
        """The job's sampler on ``device``: the one place a job builds one."""
        s = self.sampler
        if self.opts.tiling == "shifted":  # one vote per tile; the tiles carry their vote's frame
            return build_sampler(generator, s.steps, 1, s.backend, device, s.torch_dtype, self.model.content_sha256,
                                 max_batch=self.opts.batch_size, tta=False)
        return build_sampler(generator, s.steps, s.votes, s.backend, device, s.torch_dtype, self.model.content_sha256,
                             max_batch=self.opts.batch_size, tta=s.tta)

    def model_record(self, sampler: SamplerLike | None = None, device: torch.device | str | None = None
                     ) -> dict[str, Any]:
        """What every output summary records under ``model`` (and a rerun reads back)."""
        m, s = self.model, self.sampler
        record = {"weights": m.path, "sha256": m.sha256, "weights_verified": m.verified, "preset": m.preset,
                  "backend": backend_used(sampler, s.backend), "dtype": s.dtype,
                  "device": str(device if device is not None else s.device), "steps": s.steps,
                  "trained_steps": m.trained_steps, "votes": s.votes, "tta": s.tta, "threshold": self.threshold,
                  "untrained_steps": s.untrained_steps}
        return record | dict(self.extra_record)

    def resume_settings(self) -> dict[str, Any]:
        """The model and sampler settings a rerun compares (:mod:`cdal_fast.wsi.resume` adds the options)."""
        settings = {"sha256": self.model.sha256, "steps": self.sampler.steps, "votes": self.sampler.votes,
                    "tta": self.sampler.tta, "threshold": self.threshold}
        if not self.model.sha256:  # unverified weights: no hash to tell them apart
            settings["weights"] = self.model.path
        return settings


def backend_used(sampler: SamplerLike | None, backend: str) -> str:
    """The backend name for the summaries: ``auto`` is recorded with what it resolved to."""
    if backend != AUTO or sampler is None:
        return backend
    if isinstance(sampler, OnnxSampler):
        return f"{AUTO} -> {'onnx_int8' if sampler.quantisation else 'onnx'}"
    return f"{AUTO} -> eager"


def resolve_segment_job(request: SegmentRequest, bundle: ModelBundle, gpu: bool) -> SegmentJob:
    """Apply every default and check of ``segment`` once.

    ``bundle`` is the model (loaded for its config and hashes); ``gpu``: the sampling runs on a GPU
    (decides the default batch size). Raises :class:`JobError` naming the option at fault.
    """
    cfg = bundle.config
    sampler = _sampler_settings(request, cfg, gpu)
    tile = cfg.image_size
    task = get_task(request.task)
    if request.tiling is not None and not task.tiled:
        raise JobError(f"applies to tiled slides, not to {task.inputs}", "--tiling")
    tiling = request.tiling or default_tiling(sampler.votes, gpu, request.tile_overlap, task.tiled)
    shifted = tiling == "shifted"
    if request.tile_overlap is not None:
        overlap = request.tile_overlap
    else:
        overlap = SHIFTED_CONTEXT if shifted else tile // OVERLAP_FRACTION
    if not 0 <= overlap < tile:
        raise JobError(f"must be in [0, {tile}) for this model's {tile}-px tiles", "--tile-overlap")
    # one tile per CPU call in either tiling: shifted tiles in batches of V sampled 3 % faster but peaked
    # 0.74 GB higher on a 100000^2 slide (docs/benchmarks.md)
    batch = request.batch_size or (GPU_BATCH if gpu else CPU_BATCH)
    options = dict(request.options)
    if shifted:
        options |= {"tiling": tiling, "vote_frames": vote_frames(sampler.votes, sampler.tta)}
    if options.get("stain_normalise") and options.get("stain_reference") is None:
        options["stain_reference"] = _stain_reference(bundle)
    if options.get("nuclei_parquet"):
        _require_parquet()
    try:
        opts = SegmentOptions(batch_size=batch, tile_overlap=overlap, nuclei=request.nuclei and not cfg.multiclass,
                              **options)
    except OptionsError as exc:
        raise JobError(str(exc)) from None
    _check_tiling(opts, sampler)
    threshold = None if cfg.multiclass else (cfg.threshold if request.threshold is None else request.threshold)
    return SegmentJob(request.task, ModelRef.of(bundle, request.weights, request.model), sampler, threshold, opts)


def default_tiling(votes: int, gpu: bool, tile_overlap: int | None, tiled: bool = True) -> str:
    """The tiling when none is asked: the device's default for slides sampled with several votes, else
    blend (radiographs and volumes are not tiled: each image gets all its votes); an explicit
    ``--tile-overlap`` without ``--tiling`` keeps its meaning (an overlap between blended tiles)."""
    if not tiled or votes < 2 or tile_overlap is not None:
        return "blend"
    return DEFAULT_TILING["cuda" if gpu else "cpu"]


def _check_tiling(opts: SegmentOptions, sampler: SamplerSettings) -> None:
    """Shifted tiling needs a grid per vote: at least two votes, and one frame for each."""
    if opts.tiling != "shifted":
        return
    if sampler.votes < 2:
        raise JobError("shifted tiling gives each vote its own offset grid and needs at least 2 votes "
                       f"(this run has {sampler.votes}); use --tiling blend", "--tiling")
    if len(opts.vote_frames) != sampler.votes:
        raise JobError(f"shifted tiling needs one vote frame per vote: {len(opts.vote_frames)} frames for "
                       f"{sampler.votes} votes", "--tiling")


def _stain_reference(bundle: ModelBundle) -> StainProfile:
    """The stain-normalisation reference stored with the model (``NAME.stain.json``)."""
    from .stain_reference import StainReferenceError, load_stain_reference

    if bundle.path is None:
        raise JobError("--stain-normalise needs weights loaded from a file (their NAME.stain.json reference)",
                       "--stain-normalise")
    try:
        return load_stain_reference(bundle.path)
    except StainReferenceError as exc:
        raise JobError(str(exc), "--stain-normalise") from None


def _require_parquet() -> None:
    """Fail at start, before any slide is sampled, when the Parquet table cannot be written."""
    from .nuclei.parquet import require_pyarrow

    try:
        require_pyarrow()
    except ImportError as exc:
        raise JobError(str(exc), "--nuclei-parquet") from None


def _sampler_settings(request: SegmentRequest, cfg: ModelConfig, gpu: bool) -> SamplerSettings:
    if cfg.one_pass:  # one forward: there are no steps, votes or TTA to choose
        asked = [flag for flag, value in (("--steps", request.steps), ("--votes", request.votes),
                                          ("--tta", request.tta)) if value]
        if asked:
            raise JobError(f"{cfg.name} is a one-pass model (it predicts the ensemble's mean and spread in one "
                           f"forward): {', '.join(asked)} cannot be chosen", asked[0])
    elif request.steps is not None and request.steps != cfg.num_steps and not request.allow_untrained_steps:
        raise JobError(f"{request.steps} differs from the {cfg.num_steps} reverse steps this model was trained "
                       "with; pass --allow-untrained-steps to run an untrained schedule anyway", "--steps")
    if request.dtype not in DTYPES:
        raise JobError(f"unknown dtype {request.dtype!r}; choose one of {', '.join(DTYPES)}", "--dtype")
    return _settings(cfg, request.backend, request.dtype, request.device, request.steps, request.votes, request.tta)


def _settings(cfg: ModelConfig, backend: str, dtype: str, device: str, steps: int | None, votes: int | None,
              tta: bool | None) -> SamplerSettings:
    """The sampler settings ``cfg`` gives for what was asked (None: the model's own); a one-pass model
    runs one forward, with no steps, votes or TTA."""
    if cfg.one_pass:
        return SamplerSettings(backend, dtype, device, 1, 1, False)
    return SamplerSettings(backend, dtype, device, steps or cfg.num_steps, votes or cfg.votes,
                           cfg.tta if tta is None else tta, steps is not None and steps != cfg.num_steps)
