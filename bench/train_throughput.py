"""Training iterations/s (one D step + one G step) on this machine, on real shared data.

    python bench/train_throughput.py --presets tiny cxr
    python bench/train_throughput.py --presets monuseg_s --cpu-amp   # + bf16 rows, ratio vs float32
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cdal_fast.training.loop import TrainConfig, Trainer

try:
    from bench.common import write_results
except ImportError:  # run as a script
    from common import write_results

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# preset -> (task, data folder, batch, split file): the published batch sizes
SETUPS = {
    "tiny": ("monuseg", "monuseg", 4, None),
    "cxr": ("cxr", "cxr", 3, "train/splits/cxr.json"),
    "monuseg_s": ("monuseg", "monuseg", 4, None),
    "hippocampus": ("hippocampus", "hippocampus", 128, "train/splits/hippocampus.json"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "cxr"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--cpu-amp", action="store_true",
                    help="also time each preset with cpu_amp (bf16 autocast + channels_last) on the CPU")
    args = ap.parse_args()
    rows = []
    for preset in args.presets:
        task, folder, batch, split = SETUPS[preset]
        fp32_rate = None
        for cpu_amp in (False, True) if args.cpu_amp else (False,):
            with tempfile.TemporaryDirectory() as tmp:
                tc = TrainConfig(task=task, preset=preset, data=str(args.data / folder), split_file=split, out=tmp,
                                 batch_size=batch, device=args.device, progress=False, val_every=0, ckpt_every=0,
                                 cpu_amp=cpu_amp)
                trainer = Trainer(tc)
                rate = trainer.measure_speed(args.steps)
            fp32_rate = fp32_rate or rate
            rows.append({"preset": preset, "task": task, "batch": batch, "device": args.device,
                         "precision": "bf16" if trainer.amp else "float32", "it_per_s": rate,
                         "samples_per_s": rate * batch, "vs_float32": rate / fp32_rate})
            print(rows[-1], flush=True)
    write_results("train_throughput", rows, ["preset", "task", "batch", "device", "precision", "it_per_s",
                                             "samples_per_s", "vs_float32"], args.out)


if __name__ == "__main__":
    main()
