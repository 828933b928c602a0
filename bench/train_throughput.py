"""Training iterations/s (one D step + one G step) on this machine, on real shared data.

    python bench/train_throughput.py --presets tiny cxr
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cdal_fast.training import TrainConfig, Trainer

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
    args = ap.parse_args()
    rows = []
    for preset in args.presets:
        task, folder, batch, split = SETUPS[preset]
        with tempfile.TemporaryDirectory() as tmp:
            tc = TrainConfig(task=task, preset=preset, data=str(args.data / folder), split_file=split, out=tmp,
                             batch_size=batch, device=args.device, progress=False, val_every=0, ckpt_every=0)
            rate = Trainer(tc).measure_speed(args.steps)
        rows.append({"preset": preset, "task": task, "batch": batch, "device": args.device,
                     "it_per_s": rate, "samples_per_s": rate * batch})
        print(rows[-1], flush=True)
    write_results("train_throughput", rows, ["preset", "task", "batch", "device", "it_per_s", "samples_per_s"],
                  args.out)


if __name__ == "__main__":
    main()
