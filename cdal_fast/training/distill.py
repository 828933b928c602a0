"""Distil a one-pass model from a diffusion ensemble (``cdal-fast distill --config ...``).

The teacher's outputs on the training tiles (``scripts/distill_targets.py``: the pooled vote-mean
probability and vote spread of the shipped cDAL model) are the targets; the student is the teacher's
own network with a two-map head (:mod:`cdal_fast.sampling.one_pass`), initialised from the teacher
(every weight copied; the head's probability map from the teacher's head, its uncertainty map
starting near the targets' mean spread). One training step:

* a batch of random 256-px crops with the section-7 geometric augmentation (rotation, scale, flips)
  applied to the image and its targets together, bilinearly, so the targets stay soft; stain and
  colour jitter on the image only (the target is the un-jittered teacher's);
* loss = ``w_bce`` BCE(probability, teacher probability) + ``w_dice`` soft Dice(same)
  + ``w_unc`` L1(uncertainty, teacher spread) + ``w_gt`` BCE(probability, ground truth);
* AdamW, warm-up then cosine decay, an EMA of the weights (the EMA is validated and exported).

Validation is the published scoring protocol on the ``val`` split (Dice/IoU, and AJI/PQ on the
tiles with XML nuclei) of the EMA student; the best (``select``: by Dice, or by Dice + AJI) is
exported as ``OUT/best`` (safetensors + JSON with provenance), and with ``keep_validated`` every
validated student as ``OUT/validated/step_N``. ``OUT/last.pt`` (weights, EMA, optimiser, schedule,
every RNG) resumes a stopped run bit for bit; ``OUT/log.jsonl`` records every logged step and
validation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from ..evaluate import EvalResult, evaluate_task
from ..models import load_model
from ..network.generator import Generator
from ..sampling.inference import PatchRunner
from ..sampling.one_pass import OnePassSampler, maps_from_head, one_pass_head
from ..sampling.preprocess import normalise, object_sign
from .augment import color_jitter, hed_jitter, random_affine_crop
from .checkpoint import export_best, load_checkpoint, save_checkpoint
from .loop import ema_decay

__all__ = ["DistillConfig", "load_distill_config", "student_from_teacher", "load_targets", "Distiller",
           "distill_losses"]

BCE_EPS = 1e-4  # probabilities clamped away from 0 and 1 before the log
INITIAL_UNCERTAINTY = 0.05  # about the teachers' mean vote spread on MoNuSeg: where the new map starts
SELECTIONS = ("dice", "dice+aji")


@dataclass(frozen=True)
class DistillConfig:
    """A distillation run (JSON: ``train/monuseg_fast*.json``)."""

    targets: str  # folder of teacher targets (scripts/distill_targets.py)
    data: str  # labelled MoNuSeg folder: its val split scores the student
    out: str
    teacher: str | None = None  # the weights the targets came from and the student starts from (None: shipped)
    name: str = "monuseg_fast"
    max_steps: int = 3000
    max_minutes: float | None = None
    batch_size: int = 4
    lr: float = 1e-4
    lr_min: float = 1e-5
    warmup: int = 50
    ema: float = 0.995
    ema_warmup: int | None = 100
    w_bce: float = 1.0
    w_dice: float = 1.0
    w_unc: float = 2.0
    w_gt: float = 0.0
    hed_sigma: float = 0.05
    threshold: float = 0.4  # the student's decision threshold (its config; the teacher's to start with)
    select: str = "dice"  # what "best" maximises on validation: "dice", or "dice+aji" (masks and objects alike)
    keep_validated: bool = False  # also keep every validated student as OUT/validated/step_N (pick later)
    val_split: str = "val"
    val_every: int = 200
    val_at_start: bool = True
    ckpt_every: int = 25
    log_every: int = 10
    seed: int = 0
    cpu_amp: bool = False  # bfloat16 autocast on a CPU (AVX-512 BF16 / AMX)
    threads: int | None = None

    def __post_init__(self) -> None:
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "lr": self.lr,
                    "val_every": self.val_every, "ckpt_every": self.ckpt_every, "log_every": self.log_every}
        bad = [k for k, v in positive.items() if not v > 0]
        if bad or not 0 < self.threshold < 1 or not 0 <= self.ema < 1:
            raise ValueError(f"distill config: {', '.join(bad) or 'threshold/ema'} out of range")
        if self.select not in SELECTIONS:
            raise ValueError(f"distill config: select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")


def load_distill_config(path: str | Path, **overrides: Any) -> DistillConfig:
    data = json.loads(Path(path).read_text())
    known = {f.name for f in fields(DistillConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown distill config keys {', '.join(unknown)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return DistillConfig(**data)


def student_from_teacher(teacher: Generator, name: str, threshold: float) -> Generator:
    """The teacher's network with a two-map head, every weight copied; the uncertainty map starts at
    :data:`INITIAL_UNCERTAINTY` everywhere (zero weights, a bias at that level)."""
    cfg = teacher.cfg.replace(name=name, one_pass=True, votes=1, tta=False, threshold=threshold)
    student = Generator(cfg)
    own = student.state_dict()
    c = cfg.mask_channels
    with torch.no_grad():
        for key, value in teacher.state_dict().items():
            if own[key].shape == value.shape:
                own[key].copy_(value)
            else:  # the head: probability maps from the teacher's x0 maps
                own[key][:c].copy_(value)
                own[key][c:].zero_()
        own["head_conv.bias"][c:] = math.atanh(INITIAL_UNCERTAINTY * 4 - 1)  # (y + 1) / 4 = INITIAL_UNCERTAINTY
    student.load_state_dict(own)
    return student


def load_targets(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """All tiles' images (N, 3, S, S) float 0-255 and maps (N, 3, S, S): teacher probability, teacher
    spread, ground truth (0/1); and the targets' metadata."""
    folder = Path(folder)
    meta = json.loads((folder / "targets.json").read_text())
    images, maps = [], []
    for name in meta["tiles"]:
        t = load_file(str(folder / f"{name}.safetensors"))
        images.append(t["image"].float())
        maps.append(torch.cat([t["prob"].float(), t["std"].float(), t["mask"].float()]))
    return torch.stack(images), torch.stack(maps), meta


def distill_losses(prob: torch.Tensor, unc: torch.Tensor, target: torch.Tensor, dc: DistillConfig
                   ) -> dict[str, torch.Tensor]:
    """The loss terms (and their weighted sum ``loss``) of predicted maps against targets (B, 3, H, W)."""
    t_prob, t_unc, gt = target[:, :1], target[:, 1:2], (target[:, 2:3] >= 0.5).float()
    p = prob.clamp(BCE_EPS, 1 - BCE_EPS)
    terms = {"bce": F.binary_cross_entropy(p, t_prob)}
    inter = (prob * t_prob).sum((1, 2, 3))
    terms["dice"] = (1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + t_prob.sum((1, 2, 3)) + 1)).mean()
    terms["unc"] = F.l1_loss(unc, t_unc)
    terms["gt"] = F.binary_cross_entropy(p, gt) if dc.w_gt else prob.new_zeros(())
    terms["loss"] = (dc.w_bce * terms["bce"] + dc.w_dice * terms["dice"] + dc.w_unc * terms["unc"]
                     + dc.w_gt * terms["gt"])
    return terms


class Distiller:
    """The run: student, EMA, optimiser, schedule, data, RNG; steps, validation, checkpoints."""

    def __init__(self, dc: DistillConfig) -> None:
        self.dc = dc
        if dc.threads:
            torch.set_num_threads(dc.threads)
        self.out = Path(dc.out)
        self.out.mkdir(parents=True, exist_ok=True)
        teacher = load_model(dc.teacher)
        self.teacher_sha256 = teacher.sha256
        self.student = student_from_teacher(teacher.generator, dc.name, dc.threshold).train()
        if dc.cpu_amp:  # oneDNN's bfloat16 convolutions want channels-last (as the cDAL trainer's cpu_amp)
            self.student.to(memory_format=torch.channels_last)
        self.ema = student_from_teacher(teacher.generator, dc.name, dc.threshold).eval()
        self.ema.load_state_dict(self.student.state_dict())
        self.cfg = self.student.cfg
        self.images, self.maps, self.targets_meta = load_targets(dc.targets)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=dc.lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.gen = torch.Generator().manual_seed(dc.seed)
        self.step = 0
        self.best_score = -1.0

    def _lr_factor(self, step: int) -> float:
        dc = self.dc
        if step < dc.warmup:
            return (step + 1) / dc.warmup
        t = min(1.0, (step - dc.warmup) / max(1, dc.max_steps - dc.warmup))
        floor = dc.lr_min / dc.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random augmented batch: (normalised image crops, their targets)."""
        idx = torch.randint(0, self.images.shape[0], (self.dc.batch_size,), generator=self.gen)
        img, maps = random_affine_crop(self.images[idx], self.maps[idx], self.cfg.image_size, self.gen, soft=True)
        img = color_jitter(hed_jitter(img / 255.0, self.gen, self.dc.hed_sigma), self.gen) * 255.0
        return normalise(img, self.cfg), maps

    def train_step(self) -> dict[str, float]:
        image, target = self.batch()
        if self.dc.cpu_amp:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dc.cpu_amp):
            y = one_pass_head(self.student, image, self.cfg.mask_channels, self.cfg.nz, self.cfg.num_steps - 1)
        prob, unc = maps_from_head(y, self.cfg.mask_channels, object_sign(self.cfg))
        terms = distill_losses(prob, unc, target, self.dc)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            decay = ema_decay(self.dc.ema, self.step, self.dc.ema_warmup)
            for pe, p in zip(self.ema.parameters(), self.student.parameters()):
                pe.lerp_(p, 1.0 - decay)
        self.step += 1
        return {k: float(v.detach()) for k, v in terms.items()}

    def validate(self) -> EvalResult:
        runner = PatchRunner(OnePassSampler(self.ema).eval(), "cpu", batch_size=4, seed=self.dc.seed)
        return evaluate_task("monuseg", Path(self.dc.data), self.cfg, runner, split=self.dc.val_split, progress=False)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "step": self.step, "best_score": self.best_score,
                "select": self.dc.select, "gen": self.gen.get_state(), "cpu_rng": torch.get_rng_state(),
                "config": json.dumps(asdict(self.dc))}

    def resume(self) -> bool:
        st = load_checkpoint(self.out / "last.pt", torch.device("cpu"))
        if st is None:
            return False
        self.student.load_state_dict(st["student"])
        self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.step, self.best_score = int(st["step"]), float(st.get("best_score", st.get("best_dice", -1.0)))
        # another rule's scores do not compare: the next one exports (checkpoints before "select" was saved
        # held a Dice under "best_dice")
        if st.get("select", "dice") != self.dc.select:
            self.best_score = -1.0
        self.gen.set_state(st["gen"])
        torch.set_rng_state(st["cpu_rng"])
        return True

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _validate_and_select(self, start: float) -> None:
        t0 = time.monotonic()
        res = self.validate()
        inst = res.to_dict()["instance"] or {}
        self._log({"step": self.step, "val_dice": res.dice, "val_iou": res.iou, "val_aji": inst.get("aji"),
                   "val_pq": inst.get("pq"), "val_seconds": round(time.monotonic() - t0, 1),
                   "elapsed_s": round(time.monotonic() - start, 1)})
        score = float(res.dice) + (float(inst.get("aji", 0.0)) if self.dc.select == "dice+aji" else 0.0)
        prov = {"task": "monuseg", "kind": "one-pass student distilled from a cDAL ensemble", "step": self.step,
                    "distill_config": asdict(self.dc), "teacher_sha256": self.teacher_sha256,
                    "targets": {k: v for k, v in self.targets_meta.items() if k != "tiles"},
                    "val_dice": res.dice, "val_iou": res.iou, "val_instance": inst, "val_rows": res.rows,
                    "val_threshold": self.cfg.threshold, "device": "cpu", "selected_by": self.dc.select}
        if self.dc.keep_validated:
            export_best(self.out / "validated" / f"step_{self.step}", self.ema, prov, self.teacher_sha256)
        if score > self.best_score:
            self.best_score = score
            export_best(self.out / "best", self.ema, prov, self.teacher_sha256)

    def fit(self) -> dict[str, Any]:
        dc = self.dc
        start = time.monotonic()
        if self.step == 0 and dc.val_at_start:
            self._validate_and_select(start)  # the student as initialised: the score to beat
        bar = tqdm(total=dc.max_steps, initial=self.step, desc="distill", dynamic_ncols=True)
        stop, last = "max_steps", {}
        while self.step < dc.max_steps:
            if dc.max_minutes is not None and (time.monotonic() - start) / 60 >= dc.max_minutes:
                stop = "time budget"
                break
            last = self.train_step()
            bar.update(1)
            if self.step % dc.log_every == 0:
                self._log({"step": self.step, "lr": self.sched.get_last_lr()[0],
                           "elapsed_s": round(time.monotonic() - start, 1), **last})
                bar.set_postfix(loss=f"{last['loss']:.4f}")
            if self.step % dc.val_every == 0:
                self._validate_and_select(start)
            if self.step % dc.ckpt_every == 0:
                save_checkpoint(self.out / "last.pt", self.state_dict())
        bar.close()
        if self.step % dc.val_every != 0:
            self._validate_and_select(start)
        save_checkpoint(self.out / "last.pt", self.state_dict())
        return {"step": self.step, "best_score": self.best_score, "select": self.dc.select, "stop": stop,
                "minutes": (time.monotonic() - start) / 60, **last}
