"""The ``cdal-fast`` command line.

    cdal-fast info                                   what is installed and shipped
    cdal-fast train --config train/monuseg.json      train (resumes if out/last.pt exists)
    cdal-fast eval --task monuseg --data DIR         score weights by the published protocol
    cdal-fast segment slides/ --out masks/           segment slides with the shipped model
    cdal-fast import-checkpoint NETG.pth --args A.json --out DIR/NAME   run the authors' released models
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click
import torch

from . import __version__
from .cli_options import (
    ALLOW_UNTRAINED_STEPS_HELP,
    AREA_UM2,
    BATCH,
    COUNT,
    MARKER_H_UM,
    MAX_PIXELS,
    MINUTES,
    MPP,
    OD_THRESHOLDS,
    OVERLAP,
    PROBABILITY,
    RING_UM,
    SEED,
    STEPS,
    THRESHOLD_OPTION,
    TILE_SIZE,
    TTA_OPTION,
    VOTES,
    WORKERS,
    check_steps,
)
from .job import (
    AUTO,
    BACKEND_CHOICES,
    DEFAULT_TILING,
    SHIFTED_CONTEXT,
    JobError,
    SegmentJob,
    SegmentRequest,
    resolve_segment_job,
)
from .nuclei import params as nuclei_defaults
from .nuclei import stain as stain_defaults
from .runtime.requires import BackendError
from .sampling.inference import DTYPES
from .tasks import TASK_NAMES, TASKS, task_of_model
from .wsi.batch import RunReport, TaskRun, find_inputs, run_summary_name, segment_all
from .wsi.limits import DEFAULT_MAX_PIXELS
from .wsi.options import STAIN_VECTOR_CHOICES
from .wsi.tiling import TILINGS
from .wsi.tissue import DEFAULT_MIN_AREA_UM2
from .wsi.writer import PYRAMID_LAYOUTS

if TYPE_CHECKING:
    from .network.config import ModelConfig
    from .weights import ModelBundle

SHIPPED_MODELS = tuple(m for t in TASKS.values() for m in t.models)
PLAIN_OP_FORMATS = ("onnx", "tensorrt")  # export formats that cannot call the cdal custom ops


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda was asked for but this torch has no usable CUDA device")
    return dev


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cdal-fast")
def main() -> None:
    """cdal-fast: cDAL diffusion segmentation: train, evaluate, segment slides, export.

    Most users want `cdal-fast segment SLIDES... --out DIR` (see `cdal-fast segment --help`).
    `cdal-fast info` shows what is installed; docs/cli.md has the full reference.
    """
    _show_package_notices()


class _EchoHandler(logging.Handler):
    """The package's INFO lines (one-time work: a graph built into the cache) on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _show_package_notices() -> None:
    logger = logging.getLogger("cdal_fast")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
    logger.setLevel(logging.INFO)


@main.command()
def info() -> None:
    """Show versions, devices, the C++ op library (prebuilt, compiled on first use, or plain PyTorch, and why), the
    CPU's reduced-precision features and the shipped models. The first call with a torch the package was not built
    for compiles the ops (docs/install.md)."""
    from .models import MODEL_DIR, SHIPPED
    from .network import ops

    click.echo(f"cdal-fast {__version__}, torch {torch.__version__}")
    click.echo(f"CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    with warnings.catch_warnings():  # the line below says it, with the reason
        warnings.simplefilter("ignore", RuntimeWarning)
        status = ops.extension_status()
    click.echo(f"C++ ops (torch.ops.cdal): {status.describe()}")
    for model, task in SHIPPED.items():
        p = MODEL_DIR / f"{model}.safetensors"
        where = f"shipped  {p}" if p.is_file() else "not shipped"
        click.echo(f"model {model:12s} ({task}) {where}")
    from .runtime.backend_choice import resolve_backend
    from .runtime.cpu_features import cpu_features

    click.echo(f"CPU: {cpu_features().describe()}")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cfg = _default_model_config()
    for dev in devices:
        click.echo(f"--backend auto on {dev}, float32 ({cfg.name if cfg else 'any model'}): "
                   f"{resolve_backend(dev, torch.float32, cfg).describe()}")


def _default_model_config() -> ModelConfig | None:
    """The default shipped model's config (for what auto picks for it), None when it is not shipped."""
    from .models import default_weights
    from .network.config import load_config
    from .weights import WeightsError, weights_paths

    try:
        return load_config(weights_paths(default_weights())[1])
    except (WeightsError, OSError, ValueError):
        return None


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Training config JSON (see train/*.json).")
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="Override the config's data folder.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Override the output folder.")
@click.option("--max-steps", type=COUNT, default=None, help="Override the number of iterations.")
@click.option("--max-minutes", type=MINUTES, default=None, help="Stop after this many minutes (checkpoint kept).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: config, else auto).")
@click.option("--seed", type=SEED, default=None)
@click.option("--no-resume", is_flag=True, help="Start from scratch even if OUT/last.pt exists.")
@click.option("--init-weights", type=click.Path(path_type=Path), default=None,
              help="Fine-tune: start the generator from these weights (e.g. cdal_fast/models/monuseg) "
                   "instead of a random init. Ignored when the run resumes from OUT/last.pt.")
@click.option("--cpu-amp", is_flag=True,
              help="On a CPU, train in bfloat16 autocast with channels_last (faster where the CPU has "
                   "AVX512-BF16 or AMX; see bench/train_throughput.py); validation stays float32. "
                   "Same as cpu_amp: true in the config.")
def train(config_path: Path, data: str | None, out: str | None, max_steps: int | None, max_minutes: float | None,
          device: str | None, seed: int | None, no_resume: bool, init_weights: Path | None,
          cpu_amp: bool) -> None:
    """Train a cDAL model; writes OUT/last.pt (resumable), OUT/best.{safetensors,json}, OUT/log.jsonl.

    Under torchrun (several processes) gradients are averaged across processes:
    `torchrun --nproc_per_node 2 -m cdal_fast.cli train --config ...`.
    """
    import os

    import torch.distributed as dist

    from .training.loop import Trainer, load_train_config

    tc = load_train_config(config_path, data=data, out=out, max_steps=max_steps, max_minutes=max_minutes,
                           device=device, seed=seed, init_weights=str(init_weights) if init_weights else None,
                           cpu_amp=cpu_amp or None)  # unset: the config decides
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() and tc.device != "cpu" else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    finished = False
    try:
        trainer = Trainer(tc)
        click.echo(trainer.start(resume=not no_resume), err=True)
        summary = trainer.fit()
        if trainer.rank == 0:
            click.echo(json.dumps(summary))
        finished = True
    finally:
        if distributed:
            _leave_process_group(finished)


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Distillation config JSON (see train/monuseg_fast.json).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Override the output folder.")
@click.option("--max-steps", type=COUNT, default=None, help="Override the number of iterations.")
@click.option("--max-minutes", type=MINUTES, default=None, help="Stop after this many minutes (checkpoint kept).")
@click.option("--no-resume", is_flag=True, help="Start from the teacher even if OUT/last.pt exists.")
def distill(config_path: Path, out: str | None, max_steps: int | None, max_minutes: float | None,
            no_resume: bool) -> None:
    """Distil a one-pass model from the diffusion ensemble's targets (scripts/distill_targets.py makes them).

    Writes OUT/last.pt (resumable), OUT/best.{safetensors,json} (the best EMA student on the val split)
    and OUT/log.jsonl. The student predicts the ensemble's vote mean and spread in one forward per tile.
    """
    from .training.distill import Distiller, load_distill_config

    dc = load_distill_config(config_path, out=out, max_steps=max_steps, max_minutes=max_minutes)
    run = Distiller(dc)
    resumed = not no_resume and run.resume()
    click.echo(f"{'resumed at step ' + str(run.step) if resumed else 'starting from the teacher'}: "
               f"{len(run.images)} training tiles, out {dc.out}", err=True)
    click.echo(json.dumps(run.fit()))


def _stain_normaliser(bundle: ModelBundle):
    """The per-image stain normaliser onto ``bundle``'s stored reference (a usage error without one)."""
    from .nuclei.stain import StainNormaliser
    from .stain_reference import StainReferenceError, load_stain_reference

    try:
        return StainNormaliser(load_stain_reference(bundle.path))
    except StainReferenceError as exc:
        raise click.BadParameter(str(exc), param_hint="--stain-normalise") from None


def _leave_process_group(finished: bool) -> None:
    """Tear the process group down on all ranks together.

    Ranks leave the last collective at different times (rank 0 alone writes last.pt and prints),
    and a rank that destroys its gloo group and exits closes its sockets while the other still
    holds live connections to it; gloo's transport threads on that other rank then end the
    process with SIGABRT ("terminate called without an active exception"). A barrier first makes
    every rank reach teardown with no traffic left in flight. After a failure the barrier is
    skipped: the peer may never arrive, and waiting would only turn an error into a hang.
    """
    import torch.distributed as dist

    if finished:
        dist.barrier()
    dist.destroy_process_group()


def _check_model_choice(model: str | None, weights: Path | None, task: str | None = None) -> None:
    """``--model`` names a shipped file: not together with ``--weights``, and of the task being scored."""
    if model is None:
        return
    if weights is not None:
        raise click.UsageError("--model and --weights both name the weights: give one")
    owner = task_of_model(model).name
    if task is not None and owner != task:
        raise click.UsageError(f"--model {model} is a {owner} model, not a {task} one")


@main.command(name="eval")
@click.option("--task", type=click.Choice(TASK_NAMES), required=True, help="Which published protocol to score by.")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder with images/ and masks/ (imagesTr/ and labelsTr/ for hippocampus).")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Weights (.safetensors with its .json beside it). Default: the task's shipped model.")
@click.option("--model", type=click.Choice(list(SHIPPED_MODELS)), default=None,
              help="A shipped model of the task instead of --weights (e.g. monuseg-fast).")
@click.option("--split", default=None,
              help="Name of a split (e.g. val) in --split-file, else in DATA/split.json or its parent.")
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Split JSON for --split; the seeded cxr and hippocampus splits are "
                   "train/splits/cxr.json and train/splits/hippocampus.json in the repository.")
@click.option("--names", default=None, help="Comma-separated image names to score (overrides --split).")
@click.option("--steps", type=STEPS, default=None, help="Reverse steps T (default: the model's).")
@click.option("--allow-untrained-steps", is_flag=True, help=ALLOW_UNTRAINED_STEPS_HELP)
@click.option("--votes", type=VOTES, default=None, help="Votes V (default: the model's).")
@TTA_OPTION
@THRESHOLD_OPTION
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--batch-size", type=BATCH, default=4, show_default=True, help="Patches per sampler call.")
@click.option("--device", default="auto", show_default=True)
@click.option("--limit", type=COUNT, default=None, help="Score only the first N images (quick checks).")
@click.option("--stain-normalise", is_flag=True,
              help="Map each image's stains (Macenko estimate) onto the model's stain reference (NAME.stain.json "
                   "beside the weights) before the protocol runs.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write means and per-image rows here.")
def eval_cmd(task: str, data: Path, weights: Path | None, model: str | None, split: str | None,
             split_file: Path | None,
             names: str | None, steps: int | None, allow_untrained_steps: bool,
             votes: int | None, tta: bool | None, threshold: float | None, seed: int, batch_size: int, device: str,
             limit: int | None, stain_normalise: bool, json_out: Path | None) -> None:
    """Score a model on a labelled folder with the spec's section-8 protocol (Dice and IoU)."""
    from .evaluate import evaluate_task
    from .models import load_model
    from .nuclei.evaluation import INSTANCE_KEYS, mean_instance_scores
    from .sampling.inference import PatchRunner
    from .sampling.one_pass import sampler_for
    from .weights import WeightsError

    dev = _device(device)
    _check_model_choice(model, weights, task)
    try:
        bundle = load_model(weights, task=task, device=dev, model=model)
    except WeightsError as exc:
        raise click.ClickException(str(exc)) from None
    untrained = check_steps(steps, bundle.config.num_steps, allow_untrained_steps)
    use_tta = bundle.config.tta if tta is None else tta
    cfg = bundle.config if threshold is None else replace(bundle.config, threshold=threshold)
    try:
        sampler = sampler_for(bundle.generator, steps, votes, tta=use_tta).to(dev)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    runner = PatchRunner(sampler, dev, batch_size=batch_size, seed=seed)
    name_list = [n for n in names.split(",") if n] if names else None
    transform = _stain_normaliser(bundle) if stain_normalise else None
    try:
        res = evaluate_task(task, data, cfg, runner, split=split, names=name_list, limit=limit,
                            split_file=split_file, image_transform=transform)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    for r in res.rows:
        inst = "".join(f"  {k} {r[k]:.4f}" for k in INSTANCE_KEYS if k in r)
        click.echo(f"{r['name']:40s} dice {_fmt(r['dice'])}  iou {_fmt(r['iou'])}{inst}")
    click.echo(f"{'MEAN':40s} dice {_fmt(res.dice)}  iou {_fmt(res.iou)}  (n={len(res.rows)}, T={res.steps}, "
               f"V={res.votes}, TTA {'on' if use_tta else 'off'}{_threshold_note(cfg)})")
    inst_mean = mean_instance_scores(res.rows)
    if inst_mean is not None:
        click.echo(f"{'MEAN instance':40s} " + "  ".join(f"{k} {inst_mean[k]:.4f}" for k in INSTANCE_KEYS)
                   + f"  (n={inst_mean['n']} tiles with XML nuclei)")
    if transform is not None:
        click.echo(f"stain normalisation: each image's stains (Macenko) mapped onto the model's reference; "
                   f"{transform.skipped} image(s) too unstained to estimate were left as they are")
    if json_out:
        payload = res.to_dict() | {"weights": str(bundle.path), "seed": seed, "tta": use_tta,
                                   "stain_normalise": stain_normalise,
                                   "threshold": None if cfg.multiclass else cfg.threshold,
                                   "trained_steps": bundle.config.num_steps,
                                   "untrained_steps": untrained}
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(payload, indent=2) + "\n")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (created if needed).")
@click.option("--model", "task", type=click.Choice(list(SHIPPED_MODELS)), default="monuseg", show_default=True,
              help="Shipped model, and with it the task: monuseg (H&E slides/images -> nuclei), monuseg-fast (the "
                   "same task in one forward per tile, distilled from monuseg: validation Dice and AJI within the "
                   "acceptance at about 1/15 of the CPU time; recommended for CPU runs), cxr (radiographs -> "
                   "lungs), hippocampus (NIfTI MRI -> anterior/posterior labels). With --weights: the task of those "
                   "weights.")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Weights (.safetensors with its .json). Default: the shipped model of --model.")
@click.option("--recursive", "-r", is_flag=True, help="Search folders recursively.")
@click.option("--glob", "pattern", default=None, help="File-name pattern inside folders, e.g. '*.svs'.")
@click.option("--mpp", type=MPP, default=None,
              help="Micrometres per pixel of the full-resolution level; overrides the file's metadata "
                   "(needed when the file has none, e.g. PNG/JPEG).")
@click.option("--max-pixels", type=MAX_PIXELS, default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Largest slide accepted, in pixels at the model's resolution (a header or --mpp beyond it is "
                   "refused before anything is allocated); raise it for genuinely larger slides.")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda, cuda:1 ...; a list cuda:0,cuda:1 or `all` (every GPU, else the CPU) runs "
                   "one worker per device on this machine: whole inputs each, or, with fewer inputs than devices, "
                   "one slide's tile bands over all of them (cpu,cpu: two CPU workers sharing the cores).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True,
              help="Compute precision (bfloat16 is fastest on recent GPUs).")
@click.option("--backend", type=click.Choice(list(BACKEND_CHOICES)),
              default=AUTO, show_default=True,
              help="Sampler implementation. auto: the fastest measured one for the device and dtype that is "
                   "installed (`cdal-fast info` says which); onnx/tensorrt export (and build) once into "
                   "~/.cache/cdal-fast.")
@click.option("--batch-size", type=BATCH, default=None,
              help="Tiles per sampler call (default: 8 on a GPU, 1 on a CPU, where big batches only cost memory).")
@click.option("--workers", type=WORKERS, default=2, show_default=True, help="Background tile-reading processes.")
@click.option("--steps", type=STEPS, default=None, help="Reverse steps T (default: the model's).")
@click.option("--allow-untrained-steps", is_flag=True, help=ALLOW_UNTRAINED_STEPS_HELP)
@click.option("--votes", type=VOTES, default=None, help="Votes V (default: the model's).")
@TTA_OPTION
@THRESHOLD_OPTION
@click.option("--seed", type=SEED, default=0, show_default=True, help="Same seed, same mask.")
@click.option("--tiling", type=click.Choice(TILINGS), default=None,
              help="How tiles cover a slide. blend: overlapping tiles, each sampled with all V votes, blended "
                   "with a window. shifted: vote v runs on its own grid, offset so that tile borders fall in "
                   "different places for each vote and average out; each pixel still gets exactly V votes, "
                   "at the cost per area of a grid without overlap. Default: "
                   f"{DEFAULT_TILING['cpu']} on a CPU, {DEFAULT_TILING['cuda']} on a GPU; blend for one-vote "
                   "models and whenever --tile-overlap is given without --tiling.")
@click.option("--tile-overlap", type=OVERLAP, default=None,
              help="blend: overlap of adjacent tiles in model pixels (default: a quarter of the tile, 64 for "
                   f"256). shifted: context each tile reads around the cell it decides (default: {SHIFTED_CONTEXT}).")
@click.option("--no-tissue-mask", is_flag=True, help="Sample every tile, not only tiles with tissue.")
@click.option("--tissue-threshold", type=click.FloatRange(0, 255, max_open=True), default=None,
              help="Saturation (0-255) above which a thumbnail pixel is tissue (default: Otsu's threshold, >= 15).")
@click.option("--tissue-min-area", "tissue_min_area_um2", type=click.FloatRange(0, min_open=True),
              default=DEFAULT_MIN_AREA_UM2,
              show_default=True, help="Smallest tissue fragment kept, in um^2; the thumbnail is read fine enough "
                                      "for it (needle biopsies, TMA cores).")
@click.option("--save-tissue", is_flag=True,
              help="Also write NAME.tissue.png, the tissue mask used, at the thumbnail scale given in the JSON.")
@click.option("--roi", type=click.Path(exists=True, path_type=Path), default=None,
              help="Region of interest: GeoJSON polygons in level-0 pixels (QuPath export), a binary mask image at "
                   "any pyramid scale, or a folder of NAME.geojson per slide. Only tiles touching it are sampled; "
                   "outputs outside it are background.")
@click.option("--pyramid-layout", type=click.Choice(list(PYRAMID_LAYOUTS)), default="ome", show_default=True,
              help="Output pyramids: ome = OME-TIFF with SubIFDs (QuPath, Bio-Formats, napari); openslide = plain "
                   "tiled TIFF with every level a top-level IFD, NAME.mask.tif (OpenSlide-based viewers).")
@click.option("--save-prob", is_flag=True, help="Also write the probability map (uint8, 255 = 1.0).")
@click.option("--save-uncertainty", is_flag=True,
              help="Also write the vote standard deviation map (uint8, 255 = 0.5, the maximum).")
@click.option("--no-nuclei", is_flag=True,
              help="No nucleus objects: skip the labelling, the nucleus files and the JSON's nucleus numbers.")
@click.option("--no-nuclei-geojson", is_flag=True, help="Do not write NAME.nuclei.geojson (QuPath detections).")
@click.option("--nuclei-gzip", is_flag=True, help="Write the GeoJSON gzip-compressed, as NAME.nuclei.geojson.gz.")
@click.option("--no-nuclei-csv", is_flag=True, help="Do not write NAME.nuclei.csv (one row per nucleus).")
@click.option("--nuclei-threshold", type=PROBABILITY, default=nuclei_defaults.DEFAULT_PROB_THRESHOLD,
              show_default=True,
              help="Nucleus foreground where the vote-mean probability is >= this. Tuned for object scores (AJI) "
                   "apart from the mask's --threshold, which is tuned for Dice.")
@click.option("--nuclei-h", "nuclei_h_um", type=MARKER_H_UM, default=nuclei_defaults.DEFAULT_MARKER_H_UM,
              show_default=True,
              help="Marker h in um: touching nuclei are split where the distance-to-background saddle between "
                   "them is at least this deep (larger: fewer splits).")
@click.option("--nuclei-min-area", "nuclei_min_area_um2", type=AREA_UM2, default=nuclei_defaults.DEFAULT_MIN_AREA_UM2,
              show_default=True,
              help="Smallest nucleus kept, in um^2.")
@click.option("--save-labels", is_flag=True,
              help="Also write NAME.labels.ome.tif: uint32 nucleus ids (= the CSV's id) on the slide's pixel grid.")
@click.option("--nuclei-parquet", is_flag=True,
              help="Also write NAME.nuclei.parquet: the CSV's columns plus each outline (WKB, GeoParquet metadata), "
                   "streamed in row groups. Needs pyarrow (pip install 'cdal-fast[parquet]').")
@click.option("--stain", type=click.Choice(list(stain_defaults.STAIN_CHOICES)), default="h-e", show_default=True,
              help="Stains measured under each nucleus by colour deconvolution (optical density of haematoxylin and "
                   "eosin, or of haematoxylin and DAB): h-dab also classifies each nucleus Negative / 1+ / 2+ / 3+ "
                   "and adds positive %, H-score and counts per class to NAME.json; none: no stain measurements.")
@click.option("--stain-vectors", type=click.Choice(list(STAIN_VECTOR_CHOICES)), default="default", show_default=True,
              help="default: Ruifrok & Johnston's stain vectors; estimate: each slide's own (Macenko, from up to 16 "
                   "of its sampled tiles; the default vectors, with a warning, when it cannot be estimated).")
@click.option("--cell-ring", "cell_ring_um", type=RING_UM, default=stain_defaults.DEFAULT_RING_UM, show_default=True,
              help="Width in um of the ring around each nucleus measured as its cytoplasm (cell = nucleus + ring); "
                   "other nuclei are excluded from it.")
@click.option("--positivity-thresholds", type=OD_THRESHOLDS,
              default=",".join(f"{t:g}" for t in stain_defaults.DEFAULT_THRESHOLDS), show_default=True,
              help="--stain h-dab: DAB OD means at which a nucleus becomes 1+, 2+, 3+ (QuPath's defaults).")
@click.option("--positivity-compartment", type=click.Choice(list(stain_defaults.COMPARTMENTS)), default="nucleus",
              show_default=True,
              help="--stain h-dab: whose DAB OD mean decides the class: nucleus (nuclear markers: Ki-67, ER, PR), "
                   "cell or cytoplasm (the ring; membrane or cytoplasmic markers).")
@click.option("--stain-normalise", is_flag=True,
              help="Map each slide's stains (a Macenko estimate from its sampled tiles) onto the model's reference "
                   "(NAME.stain.json beside the weights, estimated from its training tiles) before sampling. Off by "
                   "default: see docs/nuclei.md for its measured effect. Measurements use the slide's own pixels.")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Write OUT/report.html (one self-contained page: a row per input with overlay, density and "
                   "uncertainty heatmaps, counts, positivity, timings, warnings and failures), updated as inputs "
                   "finish.")
@click.option("--overwrite", is_flag=True,
              help="Redo inputs whose outputs are already complete (needed to replace outputs made with "
                   "other settings).")
@click.option("--shard", default=None, metavar="I/N",
              help="Process only shard I of N (0-based) of the inputs, chosen by a hash of each input's path "
                   "relative to its folder argument: N jobs over the same inputs (a Slurm array, "
                   "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT) together do each input once.")
@click.option("--ray", "ray_address", default=None, metavar="local|auto|ADDRESS",
              help="Run on Ray actors (one model each): local = start Ray here, auto = the running cluster "
                   "(after `ray start`), or the head's HOST:PORT. Inputs and --out must be on storage every node "
                   "sees at the same path. Needs pip install 'cdal-fast[ray]'.")
@click.option("--ray-cpus-per-actor", type=click.IntRange(1), default=1, show_default=True,
              help="CPU nodes: one actor per this many cores (GPU runs: one actor per GPU).")
@click.option("--ray-actors", type=click.IntRange(1), default=None,
              help="Number of actors (default: one per GPU, or CPUs // --ray-cpus-per-actor).")
@click.option("--ray-max-retries", type=click.IntRange(0), default=2, show_default=True,
              help="Times a unit whose actor died is resubmitted before its input is reported failed.")
@click.option("--ray-unit", type=click.Choice(["auto", "input", "band"]), default="auto", show_default=True,
              help="Unit of work: whole inputs, or bands of one slide's tile rows (auto: bands when fewer "
                   "inputs than actors).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def segment(inputs: tuple[Path, ...], out_dir: Path, task: str, weights: Path | None, recursive: bool,
            pattern: str | None, device: str, dtype: str, backend: str, batch_size: int | None, steps: int | None,
            allow_untrained_steps: bool, votes: int | None, tta: bool | None, threshold: float | None,
            tiling: str | None, tile_overlap: int | None, no_tissue_mask: bool, roi: Path | None, no_nuclei: bool,
            no_nuclei_geojson: bool, no_nuclei_csv: bool, shard: str | None, ray_address: str | None,
            ray_cpus_per_actor: int, ray_actors: int | None, ray_max_retries: int, ray_unit: str, quiet: bool,
            **options) -> None:
    """Segment slides and images into masks.

    INPUTS are files or folders: TIFF / BigTIFF / OME-TIFF (pyramidal or flat), PNG / JPEG, DICOM WSI
    (a folder of one slide's instances, or a .dcm file) and SVS / NDPI / MRXS ... when OpenSlide is
    installed. For each slide OUT gets NAME.mask.ome.tif
    (pyramidal, same pixel grid as the slide; 255 = object), NAME.overlay.png, NAME.json, the nuclei
    as objects (NAME.nuclei.geojson for QuPath's File > Import objects, NAME.nuclei.csv with one row
    per nucleus with stain optical densities; count, density and area quartiles in the JSON; with
    --stain h-dab an IHC class per nucleus and positive %, H-score and counts per class), QC heatmaps,
    and with the flags NAME.prob.ome.tif / NAME.uncertainty.ome.tif / NAME.labels.ome.tif /
    NAME.nuclei.parquet; PNG/JPEG inputs get PNG masks and the same nucleus files in image pixel
    coordinates. OUT/report.html shows every input (overlay, heatmaps, numbers, failures), rewritten
    as each one finishes.
    With --model cxr, PNG/JPEG radiographs give NAME.mask.png (255 = lung); with --model
    hippocampus, NIfTI volumes give NAME.labels.nii.gz with the input's affine.
    A rerun into the same --out resumes: inputs finished with the same settings are skipped; inputs
    finished with other settings (weights, steps, votes, TTA, threshold, seed, tiling, tile overlap, mpp,
    tissue, ROI path and file contents, nucleus parameters) are reported as failed and kept, and
    --overwrite redoes them.
    Unreadable files are reported and skipped; any failure makes the exit code 1.

    Example: cdal-fast segment slides/ --out masks/ --device cuda --dtype bfloat16
    """
    shard_index, shard_count = _parse_shard(shard)
    devices = _device_list(device, ray_address)
    request = SegmentRequest(
        task=task_of_model(task).name, model=task, weights=str(weights) if weights else None, device=device,
        dtype=dtype, backend=backend, batch_size=batch_size, steps=steps, allow_untrained_steps=allow_untrained_steps,
        votes=votes, tta=tta, threshold=threshold, tile_overlap=tile_overlap, tiling=tiling, nuclei=not no_nuclei,
        options=options | {"tissue": not no_tissue_mask, "roi": str(roi.resolve()) if roi else None,
                           "nuclei_geojson": not no_nuclei_geojson, "nuclei_csv": not no_nuclei_csv})
    # With --ray or a device list this process loads the model only for its checks: workers load their own.
    local = ray_address is None and not devices
    dev = _device(device) if local else torch.device("cpu")
    gpu = dev.type == "cuda" if local else (devices[0].type == "cuda" if devices else device.startswith("cuda"))
    job, bundle = _resolve_job(request, dev, gpu, local)
    files, names = _inputs(inputs, recursive, pattern, shard_index, shard_count)
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    if ray_address is not None:
        from .distributed.ray_runner import RayOptions, run_on_ray

        ray_opts = RayOptions(address=ray_address, cpus_per_actor=ray_cpus_per_actor, actors=ray_actors,
                              max_retries=ray_max_retries, unit=ray_unit)
        report, _ = run_on_ray(files, out_dir, job.with_record(ray=ray_address), ray_opts, echo=echo,
                               show_progress=not quiet, shard=(shard_index, shard_count), names=names)
    elif devices:
        from .distributed.local import run_on_devices

        report, _ = run_on_devices(files, out_dir, job, devices, echo=echo, shard=(shard_index, shard_count),
                                   names=names, show_progress=not quiet)
    else:
        run = _local_run(job, bundle, dev)
        report = segment_all(files, out_dir, run, echo=echo, show_progress=not quiet, names=names,
                             summary_name=run_summary_name(shard_index, shard_count))
    _print_report(report, out_dir / run_summary_name(shard_index, shard_count))


def _parse_shard(shard: str | None) -> tuple[int, int]:
    from .wsi.shard import ShardError, parse_shard

    try:
        return parse_shard(shard) if shard else (0, 1)
    except ShardError as exc:
        raise click.BadParameter(str(exc), param_hint="--shard") from None


def _device_list(device: str, ray_address: str | None) -> list[torch.device] | None:
    """The devices of ``--device a,b`` / ``all`` (None for one device); with --ray, Ray's check first."""
    if ray_address is not None:
        from .distributed.ray_runner import require_ray

        try:
            require_ray()  # fail at start, before any model is loaded
        except BackendError as exc:
            raise click.ClickException(str(exc)) from None
        return None
    if "," not in device and device != "all":
        return None
    from .distributed.devices import DeviceListError, parse_devices

    try:
        devices, warning = parse_devices(device, torch.cuda.device_count())
    except DeviceListError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    if warning:
        click.echo(f"warn  {warning}", err=True)
    return devices


def _resolve_job(request: SegmentRequest, dev: torch.device, gpu: bool,
                 local: bool) -> tuple[SegmentJob, ModelBundle]:
    """Load the model and resolve the job (every default and check: :mod:`cdal_fast.job`); a local job runs
    on ``dev``, a distributed one's workers resolve ``--device`` where they run."""
    from .models import load_model
    from .weights import WeightsError

    try:
        bundle = load_model(request.weights, task=request.task, device=dev, model=request.model)
        job = resolve_segment_job(request, bundle, gpu)
    except WeightsError as exc:
        raise click.ClickException(str(exc)) from None
    except JobError as exc:
        if exc.param:
            raise click.BadParameter(str(exc), param_hint=exc.param) from None
        raise click.UsageError(str(exc)) from None
    if local:
        try:
            job.check_backend(dev)
        except BackendError as exc:
            raise click.ClickException(str(exc)) from None
    return (job.on_device(str(dev)) if local else job), bundle


def _local_run(job: SegmentJob, bundle: ModelBundle, dev: torch.device) -> TaskRun:
    """The sampler built here, and the run that samples in this process."""
    try:
        sampler = job.build_sampler(bundle.generator, dev)
    except BackendError as exc:
        raise click.ClickException(str(exc)) from None
    return TaskRun.local(job, sampler, bundle.config, dev)


def _inputs(inputs: tuple[Path, ...], recursive: bool, pattern: str | None, shard_index: int,
            shard_count: int) -> tuple[list[Path], dict[Path, str]]:
    """The inputs (this shard's) and their unique output names, settled over all inputs before any work."""
    from .wsi.outputs import NameCollisionError, output_names
    from .wsi.shard import select_shard

    files = find_inputs(list(inputs), recursive, pattern)
    if not files:
        raise click.ClickException("no slide or image files found in the inputs")
    try:
        names = output_names(files, roots=[p for p in inputs if p.is_dir()])
    except NameCollisionError as exc:
        raise click.ClickException(str(exc)) from None
    if shard_count > 1:
        found = len(files)
        files = select_shard(files, list(inputs), shard_index, shard_count)
        click.echo(f"shard {shard_index}/{shard_count}: {len(files)} of {found} inputs", err=True)
        names = {f: names[f] for f in files}
    return files, names


def _print_report(report: RunReport, summary: Path) -> None:
    r = report.to_dict()
    locked = f", {len(r['skipped_locked'])} left to another run" if r["skipped_locked"] else ""
    # each failure was reported once (a FAIL line); its traceback is in the summary
    click.echo(f"{r['processed']} done, {len(r['skipped_complete'])} already complete{locked}, "
               f"{len(r['failed'])} failed; {r['tiles']} tiles in {r['seconds']:.1f} s "
               f"({r['tiles_per_second']:.2f} tiles/s). Summary: {summary}")
    if report.failed:
        sys.exit(1)


@main.command()
@click.option("--format", "fmt", type=click.Choice(["torchscript", "aoti", "onnx", "tensorrt"]), required=True,
              help="torchscript: a scripted module (.pt); aoti: torch.export + AOTInductor (.pt2); onnx: the "
                   "unrolled sampler with explicit noise inputs (.onnx); tensorrt: an engine built from it.")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Weights to export (default: the shipped MoNuSeg model).")
@click.option("--model", type=click.Choice(list(SHIPPED_MODELS)), default=None,
              help="A shipped model to export instead of --weights (e.g. monuseg-fast, cxr).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output file.")
@click.option("--steps", type=STEPS, default=None,
              help="Reverse steps T fixed in the export (default: the model's).")
@click.option("--allow-untrained-steps", is_flag=True, help=ALLOW_UNTRAINED_STEPS_HELP)
@click.option("--votes", type=VOTES, default=None, help="Votes V fixed in the export (default: the model's).")
@TTA_OPTION
@click.option("--fused", is_flag=True, help="Call the cdal C++ ops (the C++ program must link libcdal_ops).")
@click.option("--batch", type=BATCH, default=None,
              help="aoti: the fixed batch size (default 1); tensorrt: the largest batch the engine accepts "
                   "(default 8, segment's GPU batch).")
@click.option("--size", type=TILE_SIZE, default=None, help="aoti/onnx: the fixed tile size (default: the model's).")
@click.option("--precision", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True,
              help="tensorrt: engine precision.")
def export(fmt: str, weights: Path | None, model: str | None, out: Path, steps: int | None,
           allow_untrained_steps: bool,
           votes: int | None, tta: bool | None, fused: bool,
           batch: int | None, size: int | None, precision: str) -> None:
    """Export the whole fixed-step sampler for use without Python (see docs/cpp.md).

    The module's forward(image, seed) takes float32 (B, C, H, W) pixels on the 0-255 scale and an
    int64 seed tensor and returns (probability, uncertainty); normalisation, T, V and the noise
    generator are inside, so the same image and seed give the same mask in Python and C++.
    """
    from .models import load_model
    from .runtime.export import ExportableSampler, export_aoti, export_torchscript
    from .runtime.requires import BackendError, require_ops, require_tensorrt
    from .weights import WeightsError

    if fused and fmt in PLAIN_OP_FORMATS:
        raise click.UsageError(f"--fused cannot be honoured by --format {fmt}: the graph uses standard ONNX ops "
                               "only (drop --fused; TensorRT fuses the graph itself)")
    _check_model_choice(model, weights)
    try:
        bundle = load_model(weights, model=model)  # a named model finds its own file, whatever its task
        check_steps(steps, bundle.config.num_steps, allow_untrained_steps)
        if fused:
            require_ops()
    except (WeightsError, BackendError) as exc:
        raise click.ClickException(str(exc)) from None
    use_tta = bundle.config.tta if tta is None else tta
    if fmt in PLAIN_OP_FORMATS:
        import shutil

        from .atomic import atomic_output
        from .runtime.onnx_export import export_onnx
        from .runtime.onnx_tensorrt import DEFAULT_TRT_BATCH, build_tensorrt_engine

        try:
            if fmt == "tensorrt":
                require_tensorrt()  # say what is missing before exporting anything
            if fmt == "onnx":
                path = export_onnx(bundle.generator, out, steps, votes, size, weights_sha256=bundle.sha256,
                                   tta=use_tta)
            else:
                onnx_path = export_onnx(bundle.generator, out.with_suffix(".onnx"), steps, votes, size,
                                        weights_sha256=bundle.sha256, precision=precision, tta=use_tta)
                path = out
                engine = build_tensorrt_engine(onnx_path, precision, batch or DEFAULT_TRT_BATCH)
                with atomic_output(out) as tmp:
                    shutil.copyfile(engine, tmp)
        except BackendError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"wrote {path}")
        return
    module = ExportableSampler(bundle.generator.with_fused(fused), steps, votes, tta=use_tta).eval()
    path = export_torchscript(module, out) if fmt == "torchscript" else export_aoti(module, out, batch or 1, size)
    click.echo(f"wrote {path} (T={module.num_steps}, V={module.votes}, fused={fused}, tta={use_tta})")


@main.command(name="import-checkpoint")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--args", "args_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The authors' argument file for this checkpoint (their parameters_monu.json / "
                   "parameters_lung.json / ... saved as JSON; see docs/authors.md).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output path without extension: writes OUT.safetensors and OUT.json.")
@click.option("--task", type=click.Choice(TASK_NAMES), default=None,
              help="Task (preprocessing, polarity, votes); default: from the args' dataset field.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Stored precision (the released files are float32).")
@click.option("--max-file-mib", type=click.IntRange(min=0), default=16, show_default=True,
              help="Files over this size are split into NAME.partN.safetensors shards (the package's file "
                   "cap); 0 writes one file.")
def import_checkpoint_cmd(checkpoint: Path, args_path: Path, out: Path, task: str | None, dtype: str,
                          max_file_mib: int) -> None:
    """Convert an authors' cDAL generator checkpoint (e.g. monu_mIoU_0.7096_F1_0.8292.pth) into weights
    that segment, eval and export accept. Loaded with torch.load(weights_only=True): no code runs."""
    from .authors import AuthorsCheckpointError, import_checkpoint

    try:
        st_path, cfg_path = import_checkpoint(checkpoint, args_path, out, task, DTYPES[dtype],
                                              max_file_mib * 2**20 if max_file_mib else None)
    except AuthorsCheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {st_path} and {cfg_path}")


def _threshold_note(cfg: ModelConfig) -> str:
    """", threshold T" for a binary model (what turned probabilities into the scored masks)."""
    return "" if cfg.multiclass else f", threshold {cfg.threshold:g}"


def _fmt(v: float | list[float]) -> str:
    return " / ".join(f"{x:.4f}" for x in v) if isinstance(v, list) else f"{v:.4f}"


if __name__ == "__main__":
    sys.exit(main())
