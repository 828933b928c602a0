"""How many votes do real tiles need? A study for adaptive voting (issue 33, lever 2); nothing ships.

Each MoNuSeg *validation* tile is run by the scoring protocol (resized to 512, four 256 patches) with
the shipped model's defaults (T 4, TTA), but one vote at a time: vote v sees the patch under the v-th
flip/rotation (as TTA does) with its own noise, so the running vote mean after k votes is available.
A patch stops early at the first k >= 2 where at most a fraction ``p`` of its pixels is *unsettled*:
``|mean_k - threshold| < c * std_k / sqrt(k)`` (the threshold is within c standard errors of the
running mean; :func:`cdal_fast.sampling.adaptive.votes_needed`). Each rule (c, p) is scored by the
votes it spends and its masks: Dice against the ground truth (the protocol's, at 512) and against the
same run's 5-vote masks; fixed V = 1..5 are the baselines.

    PYTHONPATH=$PWD python bench/adaptive_votes.py --data ../shared/data/monuseg
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cdal_fast.datasets import find_pairs, read_split, resolve_2d_root
from cdal_fast.metrics import dice_iou
from cdal_fast.models import load_model
from cdal_fast.runtime.backends import build_sampler
from cdal_fast.runtime.cpu_features import cpu_features
from cdal_fast.sampling.adaptive import votes_needed
from cdal_fast.sampling.dihedral import apply_dihedral, invert_dihedral, vote_codes
from cdal_fast.sampling.imageio import read_image, read_mask, resize_mask
from cdal_fast.sampling.inference import MONUSEG_WORK_SIZE, predict_monuseg_tile
from cdal_fast.sampling.preprocess import match_channels, to_chw_float
from cdal_fast.sampling.sampler import draw_noise, generators_from_seed

MAX_VOTES = 5
SEED = 0
RULES = list(itertools.product((1.0, 2.0, 3.0), (0.001, 0.01, 0.05)))  # (c, p)


def vote_probabilities(bundle, sampler, image: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """(MAX_VOTES, work, work) probability of each vote for ``image`` by the scoring protocol (its own
    patch cutting and stitching, :func:`predict_monuseg_tile`), vote v under the v-th TTA flip."""
    cfg = bundle.config
    codes = vote_codes(MAX_VOTES, True)

    def one_vote(v: int):  # noqa: ANN202  (a PatchRunner stand-in: (patches, keys) -> probabilities)
        def run(patches: torch.Tensor, keys: list) -> torch.Tensor:
            noise = draw_noise(cfg.num_steps, 1, cfg.mask_channels, cfg.nz, cfg.image_size, cfg.image_size,
                               generators_from_seed(SEED + 1000 * v, len(patches)))
            with torch.no_grad():
                x0 = sampler(apply_dihedral(patches, codes[v]), noise.x_init, noise.z, noise.post)[0]
            return invert_dihedral(x0.float(), codes[v])
        return run

    return torch.stack([predict_monuseg_tile(image, cfg, one_vote(v)) for v in range(MAX_VOTES)])


def patches_of(full: torch.Tensor, size: int) -> torch.Tensor:
    """(..., work, work) -> (n_patches, ..., size, size), row-major as the protocol cuts them."""
    n = full.shape[-1] // size
    return torch.stack([full[..., r * size:(r + 1) * size, c * size:(c + 1) * size]
                        for r in range(n) for c in range(n)])


def adaptive_mean(full: torch.Tensor, size: int, threshold: float, c: float, p: float
                  ) -> tuple[torch.Tensor, list[int]]:
    """Per patch of the (votes, work, work) maps: the running mean at the first k >= 2 whose unsettled
    fraction is <= p (else all votes), stitched back; and the votes each patch used."""
    votes = patches_of(full, size).transpose(0, 1)  # (votes, patches, S, S)
    means, used = [], []
    for j in range(votes.shape[1]):
        k_stop = votes_needed(votes[:, j], threshold, c, p)
        means.append(votes[:k_stop, j].mean(0))
        used.append(k_stop)
    return stitch(torch.stack(means)), used


def stitch(patches: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`patches_of`: (n_patches, S, S) -> (work, work)."""
    n = int(round(patches.shape[0] ** 0.5))
    return torch.cat([torch.cat(list(patches[r * n:(r + 1) * n]), dim=1) for r in range(n)], dim=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default="adaptive_votes")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    bundle = load_model(None, task="monuseg", device=torch.device("cpu"))
    cfg = bundle.config
    sampler = build_sampler(bundle.generator, None, 1, "onnx", weights_sha256=bundle.content_sha256)
    root = resolve_2d_root(args.data)
    pairs = find_pairs(root, read_split(root, "val"))
    per_tile, t0 = [], time.perf_counter()
    for name, ip, mp in pairs:
        image = match_channels(to_chw_float(read_image(ip)), cfg.img_channels)
        truth = resize_mask(torch.from_numpy(read_mask(mp)), MONUSEG_WORK_SIZE).bool()
        per_tile.append((name, vote_probabilities(bundle, sampler, image), truth))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    thr = cfg.threshold

    def mask(prob: torch.Tensor) -> torch.Tensor:
        return prob >= thr

    full = {name: mask(v.mean(0)) for name, v, _ in per_tile}
    rows = []
    for k in range(1, MAX_VOTES + 1):
        d_gt = [dice_iou(mask(v[:k].mean(0)), t)[0] for _, v, t in per_tile]
        d_full = [dice_iou(mask(v[:k].mean(0)), full[n])[0] for n, v, _ in per_tile]
        rows.append({"rule": f"fixed V={k}", "mean_votes": float(k), "dice_gt": float(np.mean(d_gt)),
                     "dice_vs_5": float(np.mean(d_full)), "patches_at": ""})
    for c, p in RULES:
        d_gt, d_full, used = [], [], []
        for name, v, t in per_tile:
            means, k_used = adaptive_mean(v, cfg.image_size, thr, c, p)
            m = mask(means)
            d_gt.append(dice_iou(m, t)[0])
            d_full.append(dice_iou(m, full[name])[0])
            used += k_used
        hist = {k: used.count(k) for k in range(2, MAX_VOTES + 1)}
        rows.append({"rule": f"adaptive c={c:g} p={p:g}", "mean_votes": float(np.mean(used)),
                     "dice_gt": float(np.mean(d_gt)), "dice_vs_5": float(np.mean(d_full)),
                     "patches_at": " ".join(f"{k}:{n}" for k, n in hist.items())})
    machine = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_features().describe()}
    note = (f"{len(per_tile)} val tiles x 4 patches by the scoring protocol, shipped model T {cfg.num_steps}, "
            f"TTA codes per vote, threshold {thr}, onnx one vote at a time ({time.perf_counter() - t0:.0f} s in all); "
            "dice_gt: mean over tiles against the ground truth at 512; dice_vs_5: against this run's 5-vote masks; "
            "patches_at: how many patches stopped after k votes")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"machine": machine, "note": note, "rows": rows}, indent=2))
    cols = ["rule", "mean_votes", "dice_gt", "dice_vs_5", "patches_at"]
    fmt = lambda x: f"{x:.4f}" if isinstance(x, float) else str(x)  # noqa: E731
    table = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                       *("| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows)])
    text = f"Machine: {json.dumps(machine)}\n\n{note}\n\n{table}\n"
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
