"""`segment --model cxr` (radiographs) and `--model hippocampus` (NIfTI volumes) with tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cdal_fast.cli import main
from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator
from cdal_fast.weights import save_weights

from .conftest import perturbed


def _weights(folder: Path, task: str, **overrides) -> Path:
    torch.manual_seed(0)
    save_weights(folder / task, perturbed(Generator(get_preset("tiny", **overrides))).eval(),
                 provenance={"task": task}, dtype=torch.float32)
    return folder / f"{task}.safetensors"


def run(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["segment", *args, "-q", "--workers", "0"])
    return res.exit_code, res.output


def test_radiographs(tmp_path, shared_data):
    w = _weights(tmp_path, "cxr", img_channels=1, norm_mean=(127.5,), norm_std=(127.5,), mpp=None)
    names = sorted((shared_data / "cxr" / "images").glob("*.png"))[:2]
    out = tmp_path / "out"
    code, output = run([*map(str, names), "--out", str(out), "--model", "cxr", "--weights", str(w)])
    assert code == 0, output
    for p in names:
        mask = np.asarray(Image.open(out / f"{p.stem}.mask.png"))
        assert mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 255}
        assert json.loads((out / f"{p.stem}.json").read_text())["complete"]
    code, output = run([str(names[0]), "--out", str(out), "--model", "cxr", "--weights", str(w)])
    assert code == 0 and "already complete" in output


def test_volumes(tmp_path, shared_data):
    import nibabel as nib

    w = _weights(tmp_path, "hippocampus", img_channels=1, mask_channels=3, image_size=32, norm_mean=(0.0,),
                 norm_std=(1.0,), attn_resolutions=(8,), mpp=None)
    vol = sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "out"
    code, output = run([str(vol), "--out", str(out), "--model", "hippocampus", "--weights", str(w),
                        "--batch-size", "32"])
    assert code == 0, output
    src = nib.load(str(vol))
    stem = vol.name[: -len(".nii.gz")]
    lab = nib.load(str(out / f"{stem}.labels.nii.gz"))
    assert lab.shape == src.shape and np.allclose(lab.affine, src.affine)
    assert set(np.unique(np.asarray(lab.dataobj))) <= {0, 1, 2}
    summary = json.loads((out / f"{stem}.json").read_text())
    assert summary["complete"] and sum(summary["class_voxels"].values()) == int(np.prod(src.shape))
    assert src.shape == (35, 51, 35) and summary["tiles_sampled"] == 2 * 4 * 2 * 32  # windows x axial slices
    # a PNG is not a volume: reported, the run fails
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    code, output = run([str(tmp_path / "x.png"), "--out", str(out), "--model", "hippocampus", "--weights", str(w)])
    assert code == 1 and "NIfTI" in output


def test_unshipped_model_message(tmp_path, no_shipped_models):
    """A build without a task's weights says so and names --weights."""
    code, output = run([str(tmp_path), "--out", str(tmp_path / "o"), "--model", "cxr"])
    assert code != 0 and "not shipped" in output and "--weights" in output


def test_volume_window_protocol_matches_eval(tmp_path, shared_data):
    """segment's volume path is the eval protocol: same labels as predict_volume on the same noise."""
    import nibabel as nib

    from cdal_fast.sampling.inference import PatchRunner, predict_volume
    from cdal_fast.sampling.sampler import FixedStepSampler
    from cdal_fast.weights import load_weights

    w = _weights(tmp_path, "hippocampus", img_channels=1, mask_channels=3, image_size=32, norm_mean=(0.0,),
                 norm_std=(1.0,), attn_resolutions=(8,), mpp=None)
    vol_path = sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[1]
    bundle = load_weights(w)
    runner = PatchRunner(FixedStepSampler(bundle.generator), batch_size=32, seed=0)
    counted: list[int] = []
    expected = predict_volume(np.asarray(nib.load(str(vol_path)).dataobj, dtype=np.float32), bundle.config, runner,
                              progress=counted.append)
    code, output = run([str(vol_path), "--out", str(tmp_path / "o"), "--model", "hippocampus", "--weights", str(w),
                        "--batch-size", "32"])
    assert code == 0, output
    got = nib.load(str(tmp_path / "o" / (vol_path.name[: -len(".nii.gz")] + ".labels.nii.gz")))
    assert np.array_equal(np.asarray(got.dataobj), expected.numpy())
    # progress counts axial slices window by window, the unit of the summary's tiles_sampled
    summary = json.loads((tmp_path / "o" / (vol_path.name[: -len(".nii.gz")] + ".json")).read_text())
    assert set(counted) == {32} and sum(counted) == summary["tiles_sampled"]


def test_eval_hippocampus_on_the_seeded_split(tmp_path, shared_data):
    """`eval --split val --split-file train/splits/hippocampus.json` scores the split's first volume."""
    w = _weights(tmp_path, "hippocampus", img_channels=1, mask_channels=3, image_size=32, norm_mean=(0.0,),
                 norm_std=(1.0,), attn_resolutions=(8,), mpp=None)
    split_file = Path(__file__).resolve().parents[1] / "train" / "splits" / "hippocampus.json"
    first_val = json.loads(split_file.read_text())["val"][0]
    args = ["eval", "--task", "hippocampus", "--data", str(shared_data / "hippocampus"), "--weights", str(w),
            "--split", "val", "--limit", "1", "--batch-size", "32", "--device", "cpu"]
    res = CliRunner().invoke(main, args)  # no split.json beside the data: a clear hint
    assert res.exit_code != 0 and "train/splits/<task>.json" in res.output
    res = CliRunner().invoke(main, [*args, "--split-file", str(split_file), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["n"] == 1 and data["rows"][0]["name"] == first_val
    assert len(data["dice"]) == 2 and data["dice"] == data["rows"][0]["dice"]  # anterior, posterior; n = 1
    # per class, IoU = Dice / (2 - Dice): a swapped class order or field would break it
    assert data["iou"] == pytest.approx([d / (2 - d) for d in data["dice"]], rel=1e-6)
