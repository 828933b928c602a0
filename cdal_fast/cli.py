"""The ``cdal-fast`` command line.

    cdal-fast info                                   what is installed and shipped
    cdal-fast train --config train/monuseg.json      train (resumes if out/last.pt exists)
    cdal-fast eval --task monuseg --data DIR         score weights by the published protocol
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

from . import __version__

TASKS = ("monuseg", "cxr", "hippocampus")


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

    Start with `cdal-fast info`, then `cdal-fast eval --help` or `cdal-fast train --help`.
    """


@main.command()
def info() -> None:
    """Show versions, devices, the C++ op library and the shipped models."""
    from . import ops
    from .models import MODEL_DIR, SHIPPED

    click.echo(f"cdal-fast {__version__}, torch {torch.__version__}")
    click.echo(f"CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    click.echo(f"C++ ops (torch.ops.cdal): {'loaded' if ops.extension_available() else 'not built'}")
    for task, stem in SHIPPED.items():
        p = MODEL_DIR / f"{stem}.safetensors"
        click.echo(f"model {task:12s} {'shipped' if p.is_file() else 'not shipped'}  {p if p.is_file() else ''}")


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Training config JSON (see train/*.json).")
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="Override the config's data folder.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Override the output folder.")
@click.option("--max-steps", type=int, default=None, help="Override the number of iterations.")
@click.option("--max-minutes", type=float, default=None, help="Stop after this many minutes (checkpoint kept).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: config, else auto).")
@click.option("--seed", type=int, default=None)
@click.option("--no-resume", is_flag=True, help="Start from scratch even if OUT/last.pt exists.")
def train(config_path: Path, data: str | None, out: str | None, max_steps: int | None, max_minutes: float | None,
          device: str | None, seed: int | None, no_resume: bool) -> None:
    """Train a cDAL model; writes OUT/last.pt (resumable), OUT/best.{safetensors,json}, OUT/log.jsonl.

    Under torchrun (several processes) gradients are averaged across processes:
    `torchrun --nproc_per_node 2 -m cdal_fast.cli train --config ...`.
    """
    import os

    import torch.distributed as dist

    from .training import Trainer, load_train_config

    tc = load_train_config(config_path, data=data, out=out, max_steps=max_steps, max_minutes=max_minutes,
                           device=device, seed=seed)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() and tc.device != "cpu" else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        trainer = Trainer(tc)
        if not no_resume and trainer.resume():
            click.echo(f"resumed from {trainer.out / 'last.pt'} at step {trainer.step}", err=True)
        summary = trainer.fit()
        if trainer.rank == 0:
            click.echo(json.dumps(summary))
    finally:
        if distributed:
            dist.destroy_process_group()


@main.command(name="eval")
@click.option("--task", type=click.Choice(TASKS), required=True, help="Which published protocol to score by.")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder with images/ and masks/ (imagesTr/ and labelsTr/ for hippocampus).")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Weights (.safetensors with its .json beside it). Default: the task's shipped model.")
@click.option("--split", default=None, help="Name of a split in DATA/split.json or its parent (e.g. val).")
@click.option("--names", default=None, help="Comma-separated image names to score (overrides --split).")
@click.option("--steps", type=int, default=None, help="Reverse steps T (default: the model's).")
@click.option("--votes", type=int, default=None, help="Votes V (default: the model's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Patches per sampler call.")
@click.option("--device", default="auto", show_default=True)
@click.option("--limit", type=int, default=None, help="Score only the first N images (quick checks).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write means and per-image rows here.")
def eval_cmd(task: str, data: Path, weights: Path | None, split: str | None, names: str | None, steps: int | None,
             votes: int | None, seed: int, batch_size: int, device: str, limit: int | None,
             json_out: Path | None) -> None:
    """Score a model on a labelled folder with the spec's section-8 protocol (Dice and IoU)."""
    from .evaluate import PatchRunner, evaluate_task
    from .models import load_model
    from .sampler import FixedStepSampler
    from .weights import WeightsError

    dev = _device(device)
    try:
        bundle = load_model(weights, task=task, device=dev)
    except WeightsError as exc:
        raise click.ClickException(str(exc)) from None
    sampler = FixedStepSampler(bundle.generator, steps, votes).to(dev)
    runner = PatchRunner(sampler, dev, batch_size=batch_size, seed=seed)
    name_list = [n for n in names.split(",") if n] if names else None
    try:
        res = evaluate_task(task, data, bundle.config, runner, split=split, names=name_list, limit=limit)
    except (FileNotFoundError, KeyError) as exc:
        raise click.ClickException(str(exc)) from None
    for r in res.rows:
        click.echo(f"{r['name']:40s} dice {_fmt(r['dice'])}  iou {_fmt(r['iou'])}")
    click.echo(f"{'MEAN':40s} dice {_fmt(res.dice)}  iou {_fmt(res.iou)}  (n={len(res.rows)}, T={res.steps}, "
               f"V={res.votes})")
    if json_out:
        payload = res.to_dict() | {"weights": str(bundle.path), "seed": seed}
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(payload, indent=2) + "\n")


def _fmt(v: float | list[float]) -> str:
    return " / ".join(f"{x:.4f}" for x in v) if isinstance(v, list) else f"{v:.4f}"


if __name__ == "__main__":
    sys.exit(main())
