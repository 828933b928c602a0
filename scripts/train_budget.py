"""One prepared, time-budgeted training run for a lent GPU (any task): probe speed, train in a
fixed budget, evaluate the selected weights on the validation split by the section-8 protocol,
write weights + metrics to OUT.

    python scripts/train_budget.py --config train/monuseg_s.json --data .gpu/monuseg512 --out $OUT --minutes 6.5
    python scripts/train_budget.py --config train/cxr_budget.json --data .gpu/cxr --out $OUT --minutes 4

The number of iterations is chosen from a 30-iteration speed probe so that a cosine learning rate
annealed over the run (``cosine_t_max: null``) reaches its floor inside the time budget;
``--minutes`` also caps the run itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from cdal_fast.evaluate import evaluate_task
from cdal_fast.sampling.inference import PatchRunner
from cdal_fast.sampling.sampler import FixedStepSampler
from cdal_fast.training.loop import Trainer, load_train_config
from cdal_fast.weights import load_weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="train/monuseg_s.json")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=6.5)
    ap.add_argument("--probe-steps", type=int, default=30)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # 1. speed probe (also warms cuDNN's algorithm choice)
    probe = load_train_config(args.config, data=args.data, out="/tmp/cdal_probe", device=args.device,
                              progress=False)
    rate = Trainer(probe).measure_speed(args.probe_steps, warmup=5)
    budget_s = args.minutes * 60 - (time.monotonic() - t_start)
    steps = max(50, int(rate * budget_s * 0.93))  # leave room for validation passes
    print(json.dumps({"probe_it_per_s": rate, "planned_steps": steps}), flush=True)

    # 2. the run
    run_dir = Path("/tmp/cdal_run")  # last.pt (G, D, optimisers) is too large to bring back
    tc = load_train_config(args.config, data=args.data, out=str(run_dir), device=args.device,
                           max_steps=steps, max_minutes=budget_s / 60, progress=False, ckpt_every=10**9)
    trainer = Trainer(tc)
    print(trainer.start(resume=False), flush=True)  # a config with init_weights fine-tunes
    t_train = time.monotonic()
    summary = trainer.fit()
    summary["train_minutes"] = (time.monotonic() - t_train) / 60
    summary["probe_it_per_s"] = rate
    summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(json.dumps(summary), flush=True)
    for name in ("best.safetensors", "best.json", "log.jsonl"):
        shutil.copy(run_dir / name, out / name)

    # 3. evaluation of the selected weights by the section-8 protocol (float32 sampler)
    bundle = load_weights(out / "best", device=trainer.device)
    sampler = FixedStepSampler(bundle.generator).to(trainer.device)  # the preset's T and V
    batch = 32 if tc.task == "hippocampus" else 4  # one 32-slice window per call
    runner = PatchRunner(sampler, trainer.device, batch_size=batch, seed=0)
    res = evaluate_task(tc.task, Path(args.data), bundle.config, runner, split=tc.val_split, progress=False,
                        split_file=tc.split_file)
    result = {"summary": summary, "val": res.to_dict(), "train_config": tc.to_dict()}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"val_dice": res.dice, "val_iou": res.iou}), flush=True)


if __name__ == "__main__":
    main()
