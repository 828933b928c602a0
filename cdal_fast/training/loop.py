"""cDAL training (spec section 6): discriminator step with R1, spatial-attention generator step.

One :class:`Trainer` owns the networks, optimisers, schedulers, the optional EMA and a single
``torch.Generator`` on the training device from which every random number is drawn (batches,
augmentations, steps k, diffusion noise, latents). A checkpoint stores all of it, so a resumed run
takes exactly the steps an uninterrupted one would.

The loop only orders the work: the two losses are :mod:`cdal_fast.training.losses` (no optimiser inside),
checkpoints and the export of selected weights :mod:`cdal_fast.training.checkpoint`, and the precision
(bf16 autocast, channels_last) is decided once in a frozen :class:`cdal_fast.training.precision.Precision`.

Data parallel: launched under ``torchrun`` each process trains on its own batches (generator seeded
with seed + rank) and gradients are averaged with one all-reduce per network and step. Explicit
all-reduce (rather than DistributedDataParallel) keeps the R1 penalty's double backward simple.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..evaluate import EvalResult, evaluate_task, scalar_dice
from ..network.config import ModelConfig, get_preset
from ..network.diffusion import make_schedule
from ..network.discriminator import Discriminator
from ..network.generator import Generator
from ..sampling.inference import PatchRunner
from ..sampling.sampler import FixedStepSampler
from ..weights import load_weights
from . import checkpoint
from .data import TaskData, load_task_data
from .losses import LossDraws, d_loss, g_loss, r1_due
from .precision import Precision

__all__ = ["TrainConfig", "Trainer", "load_train_config"]


def ema_decay(target: float, step: int, warmup: int | None) -> float:
    """EMA decay for the update after optimiser step ``step`` (0-based).

    With ``warmup`` the decay ramps as ``(1 + step) / (warmup + step)`` up to ``target``. Why: runs
    here last a few hundred to a few thousand steps, and a fixed 0.999 from step 0 keeps
    ``0.999 ** steps`` of the random initialisation in the average (58 % after the 551 steps of the
    first shipped MoNuSeg run); the ramp lets the average follow the early, fast-moving weights.
    """
    if warmup is None:
        return target
    return min(target, (1.0 + step) / (warmup + step))


ATTENTION_MODES = ("discriminator", "none")  # TrainConfig.attention


@dataclass
class TrainConfig:
    """Everything a training run needs; JSON files under ``train/`` hold these fields."""

    task: str = "monuseg"
    preset: str = "monuseg"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: str = "../shared/data/monuseg"
    train_split: str = "train"
    val_split: str = "val"
    split_file: str | None = None  # default: split.json in or beside the data folder
    out: str = "runs/monuseg"
    batch_size: int = 4
    lr_g: float = 2e-4
    lr_d: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    r1_gamma: float = 1.0
    lazy_reg: int | None = 10
    ema: float | None = None
    ema_warmup: int | None = 10  # decay min(ema, (1 + step) / (ema_warmup + step)); None: fixed decay
    cosine: bool = True
    cosine_t_max: int | None = 500  # in epochs; None: anneal over max_steps
    eta_min: float = 1e-5
    epoch_iters: int | None = None  # default: ceil(dataset size / batch)
    max_steps: int = 1000
    max_minutes: float | None = None
    val_every: int = 200
    val_limit: int | None = None
    val_steps: int | None = None  # T for validation (default: the model's)
    val_votes: int | None = None
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 0
    init_weights: str | None = None  # start G (and its EMA) from saved weights: fine-tuning
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA (and on CPU with cpu_amp)
    # bf16 autocast + channels_last for CPU training too: oneDNN's bf16 convolutions pay off on CPUs
    # with AVX512-BF16 or AMX (bench/train_throughput.py --cpu-amp). Validation stays float32.
    cpu_amp: bool = False
    hed_jitter: float = 0.0  # MoNuSeg: H&E stain jitter sigma (Tellez et al. 2018); 0 keeps the spec's recipe
    # "discriminator": the spec's recipe (D trained, its features weight the mask in G's loss).
    # "none": generator-only fine-tune, D neither trained nor read (attention 1): several times
    # cheaper per step on a CPU, for fine-tuning shipped weights only.
    attention: str = "discriminator"
    # a fine-tune validates its starting weights first (the score to beat); False when that score is
    # already known (a model card), and "best" is then the best of this run's validations only
    val_at_start: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, not {self.attention!r}")
        if self.attention == "none" and not self.init_weights:
            raise ValueError("attention 'none' trains the generator alone, which only fine-tunes: "
                             "give init_weights")

    def model_config(self) -> ModelConfig:
        return get_preset(self.preset, **self.model_overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_train_config(path: str | Path, **overrides: Any) -> TrainConfig:
    data = json.loads(Path(path).read_text())
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "betas" in data:
        data["betas"] = tuple(data["betas"])
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown training config keys: {', '.join(unknown)}")
    try:
        return TrainConfig(**data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


class Trainer:
    def __init__(self, tc: TrainConfig, data: TaskData | None = None) -> None:
        self.tc = tc
        self.rank, self.world = 0, 1
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        dev = tc.device
        if dev == "auto":
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        self.cuda = self.device.type == "cuda"
        self.cfg = tc.model_config()
        self.out = Path(tc.out)
        self.out.mkdir(parents=True, exist_ok=True)

        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.G = Generator(self.cfg).to(self.device)
        # a generator-only run has no D at all: nothing of it is built, trained or checkpointed
        self.D: Discriminator | None = None
        if tc.attention == "discriminator":
            self.D = Discriminator(self.cfg).to(self.device)
        self.precision = Precision.decide(self.device, tc.amp, tc.cpu_amp, tc.channels_last)
        if self.channels_last:
            self.G = self.G.to(memory_format=torch.channels_last)
            if self.D is not None:
                self.D = self.D.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.G).eval().requires_grad_(False) if tc.ema else None
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=tc.lr_g, betas=tc.betas)
        self.opt_d = (torch.optim.Adam(self.D.parameters(), lr=tc.lr_d, betas=tc.betas)
                      if self.D is not None else None)
        self.sched = make_schedule(self.cfg.num_steps, self.cfg.beta_min, self.cfg.beta_max).to(self.device)

        if data is None:
            data = load_task_data(tc.task, Path(tc.data), self.cfg, tc.train_split, tc.split_file)
        self.data = dataclasses.replace(data.to(self.device), hed_sigma=tc.hed_jitter)
        self.epoch_iters = tc.epoch_iters or max(1, math.ceil(len(self.data) / tc.batch_size))
        self.sched_g = self._cosine(self.opt_g)
        self.sched_d = self._cosine(self.opt_d) if self.opt_d is not None else None
        self.gen = torch.Generator(device=self.device).manual_seed(tc.seed + 1000 * self.rank)
        self.draws = LossDraws(self.gen, self.device, self.cfg.num_steps, self.cfg.nz)
        self.step = 0
        self.best_dice = -1.0
        self.init_sha256 = ""  # the weights a fine-tune started from (provenance)

    # -- precision (decided once, in self.precision) ------------------------------------------
    @property
    def amp(self) -> bool:
        return self.precision.amp

    @property
    def val_amp(self) -> bool:
        return self.precision.val_amp

    @property
    def channels_last(self) -> bool:
        return self.precision.channels_last

    # -- pieces ------------------------------------------------------------------------------
    def _cosine(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        if not self.tc.cosine:
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        # stepped per iteration; T_max counted in epochs as in the paper, or the whole run
        t_max = self.tc.cosine_t_max * self.epoch_iters if self.tc.cosine_t_max else self.tc.max_steps
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=self.tc.eta_min)

    def _allreduce(self, module: torch.nn.Module) -> None:
        if self.world == 1:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def train_step(self) -> dict[str, float]:
        """One D step (unless ``attention`` is "none") and one G step (losses from :mod:`cdal_fast.training.losses`);
        returns the losses."""
        tc = self.tc
        y, x0 = self.data.batch(tc.batch_size, self.gen)
        if self.channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        autocast = self.precision.autocast

        train_d = self.D is not None
        if train_d:
            self.D.requires_grad_(True)
            self.opt_d.zero_grad(set_to_none=True)
            d = d_loss(self.G, self.D, self.sched, y, x0, self.draws, tc.r1_gamma,
                       r1_due(self.step, tc.r1_gamma, tc.lazy_reg), autocast)
            d.total.backward()
            self._allreduce(self.D)
            self.opt_d.step()
            self.D.requires_grad_(False)

        self.opt_g.zero_grad(set_to_none=True)
        g = g_loss(self.G, self.D, self.sched, y, x0, self.draws, self.cfg.attn_scale,
                   autocast)
        g.total.backward()
        self._allreduce(self.G)
        self.opt_g.step()
        if self.ema is not None:
            self._ema_update()
        self.sched_g.step()
        if train_d:
            self.sched_d.step()
        self.step += 1
        losses = {"loss_g": g.total.item()}
        if train_d:
            losses.update(d_real=d.err_real.item(), d_fake=d.err_fake.item(), r1=d.r1.item())
        return losses

    @torch.no_grad()
    def _ema_update(self) -> None:
        decay = ema_decay(self.tc.ema, self.step, self.tc.ema_warmup)
        for pe, p in zip(self.ema.parameters(), self.G.parameters()):
            pe.lerp_(p, 1.0 - decay)

    def measure_speed(self, steps: int, warmup: int = 1) -> float:
        """Iterations per second over ``steps`` training steps after ``warmup`` (which also trains)."""
        for _ in range(warmup):
            self.train_step()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.train_step()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return steps / (time.perf_counter() - t0)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return checkpoint.state_dict(self, self.tc.to_dict())

    def load_state_dict(self, st: dict[str, Any]) -> None:
        checkpoint.load_state_dict(self, st)

    def save_checkpoint(self, name: str = "last.pt") -> Path:
        return checkpoint.save_checkpoint(self.out / name, self.state_dict(), self.rank)

    def resume(self, path: str | Path | None = None) -> bool:
        """Load ``path`` (default ``out/last.pt``) if it exists; True when resumed."""
        st = checkpoint.load_checkpoint(Path(path) if path else self.out / "last.pt", self.device)
        if st is None:
            return False
        saved = json.loads(st.get("train", "{}")).get("attention", "discriminator")
        if saved != self.tc.attention:
            # a generator-only run never trained D: resuming it with D (or the reverse) would pair an
            # untrained D, or a D schedule at step 0, with a trained G
            raise ValueError(f"checkpoint {path or self.out / 'last.pt'} was trained with attention {saved!r}, this "
                             f"run asks for {self.tc.attention!r}: start a new run (another out folder) to switch")
        self.load_state_dict(st)
        return True

    def start(self, resume: bool = True) -> str:
        """Resume from ``out/last.pt``, else start G from ``init_weights``, else from the random
        init; returns a line saying which (a resumed run already holds its fine-tuned weights)."""
        if resume and self.resume():
            return f"resumed from {self.out / 'last.pt'} at step {self.step}"
        if self.tc.init_weights:
            self.init_from(self.tc.init_weights)
            return f"generator initialised from {self.tc.init_weights}"
        return "random initialisation"

    def init_from(self, path: str | Path) -> None:
        """Start G and its EMA from saved generator weights (a fine-tune); D starts fresh.

        Why D starts fresh: shipped weights hold the generator only. Its loss is the reconstruction
        term, and D only shapes it through the attention map, so a new D re-learns that quickly.
        The weights' model config must equal this run's preset, field by field, apart from the
        inference defaults (``INFERENCE_FIELDS``, e.g. ``tta``) a shipped model may carry.
        """
        bundle = load_weights(path, device=self.device)
        mine, theirs = self.cfg.architecture_dict(), bundle.config.architecture_dict()
        if mine != theirs:
            diff = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise ValueError(f"init_weights {path}: model config differs from preset {self.tc.preset!r} "
                             f"in {', '.join(diff)}")
        state = bundle.generator.state_dict()
        for target in (self.G, self.ema):
            if target is not None:
                target.load_state_dict(state)
        self.init_sha256 = bundle.sha256

    def inference_generator(self) -> Generator:
        return self.ema if self.ema is not None else self.G

    # -- validation and the loop ------------------------------------------------------------
    def val_sampler(self) -> FixedStepSampler:
        """The sampler validation scores with: the run's T and V, and the model config's TTA, so a run
        whose ``model_overrides`` carry the shipped defaults selects at the protocol it ships with."""
        return FixedStepSampler(self.inference_generator(), self.tc.val_steps, self.tc.val_votes,
                                tta=self.cfg.tta).to(self.device)

    def validate(self) -> EvalResult:
        g = self.inference_generator()
        was_training = g.training
        g.eval()
        runner = PatchRunner(self.val_sampler(), self.device, torch.float32, batch_size=8, seed=0)
        with self.precision.val_autocast():
            res = evaluate_task(self.tc.task, Path(self.tc.data), self.cfg, runner, split=self.tc.val_split,
                                limit=self.tc.val_limit, progress=False, split_file=self.tc.split_file)
        g.train(was_training)
        return res

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def export(self, name: str = "best", extra: dict[str, Any] | None = None) -> None:
        if self.rank != 0:
            return
        prov = {"task": self.tc.task, "step": self.step, "train_config": self.tc.to_dict(),
                "device": torch.cuda.get_device_name(self.device) if self.cuda else "cpu", **(extra or {})}
        checkpoint.export_best(self.out / name, self.inference_generator(), prov, self.init_sha256)

    def fit(self) -> dict[str, Any]:
        tc = self.tc
        self.G.train()
        if self.D is not None:
            self.D.train()
        start = time.monotonic()
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not (tc.progress and self.rank == 0),
                   desc="train", dynamic_ncols=True)
        last: dict[str, float] = {}
        stop_reason = "max_steps"
        if self.step == 0 and tc.init_weights and tc.val_every and tc.val_at_start:
            self._validate_and_select(start)  # the starting point is the score to beat
        while self.step < tc.max_steps:
            if tc.max_minutes is not None and (time.monotonic() - start) / 60 >= tc.max_minutes:
                stop_reason = "time budget"
                break
            last = self.train_step()
            bar.update(1)
            if self.step % tc.log_every == 0:
                rec = {"step": self.step, "lr_g": self.sched_g.get_last_lr()[0],
                       "elapsed_s": round(time.monotonic() - start, 2), **last}
                self._log(rec)
                bar.set_postfix(loss_g=f"{last['loss_g']:.4f}")
            if tc.val_every and self.step % tc.val_every == 0:
                self._validate_and_select(start)
            if tc.ckpt_every and self.step % tc.ckpt_every == 0:
                self.save_checkpoint()
        bar.close()
        if tc.val_every and self.step % tc.val_every != 0:
            self._validate_and_select(start)
        self.save_checkpoint()
        summary = {"step": self.step, "best_dice": self.best_dice, "stop": stop_reason,
                   "minutes": (time.monotonic() - start) / 60, **last}
        if self.world > 1:
            summary["ranks_in_sync"] = self.ranks_in_sync()
        return summary

    def ranks_in_sync(self) -> bool:
        """True when every process holds bit-identical G and D weights (data-parallel check)."""
        nets = [self.G] if self.D is None else [self.G, self.D]
        flat = torch.cat([p.detach().reshape(-1).float() for net in nets for p in net.parameters()])
        lo, hi = flat.clone(), flat.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return bool(torch.equal(lo, hi))

    def _validate_and_select(self, start: float) -> None:
        if self.rank != 0:
            return
        res = self.validate()
        d = scalar_dice(res)
        self._log({"step": self.step, "val_dice": res.dice, "val_iou": res.iou,
                   "elapsed_s": round(time.monotonic() - start, 2)})
        if d > self.best_dice:
            self.best_dice = d
            self.export("best", {"val_dice": res.dice, "val_iou": res.iou, "val_rows": res.rows,
                                 "val_steps": res.steps, "val_votes": res.votes, "val_tta": self.cfg.tta,
                                 "val_threshold": None if self.cfg.multiclass else self.cfg.threshold})
