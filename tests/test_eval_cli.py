"""`cdal-fast eval` and the shipped model."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cdal_fast.cli import main
from cdal_fast.metrics import dice_iou, per_class_dice_iou
from cdal_fast.models import MAX_FILE_BYTES, MAX_MODEL_BYTES, MODEL_DIR, default_weights, load_model
from cdal_fast.weights import save_weights


def test_metrics_known_values():
    a = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    d, i = dice_iou(a, b)
    assert d == pytest.approx(0.5) and i == pytest.approx(1 / 3)
    assert dice_iou(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == (1.0, 1.0)
    dl, il = per_class_dice_iou(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]), [1, 2])
    assert dl == pytest.approx([2 / 3, 2 / 3]) and il == pytest.approx([0.5, 0.5])


def test_eval_any_weights_on_val_split(tmp_path, tiny_gen, shared_data):
    save_weights(tmp_path / "w", tiny_gen)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["eval", "--task", "monuseg", "--data", str(shared_data / "monuseg"), "--split",
                                    "val", "--weights", str(tmp_path / "w.safetensors"), "--limit", "1",
                                    "--json", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    # one image: the mean is that image's row, and its IoU is Dice / (2 - Dice) (both from one confusion count)
    assert data["n"] == 1 and data["dice"] == data["rows"][0]["dice"]
    assert data["iou"] == pytest.approx(data["dice"] / (2 - data["dice"]), rel=1e-6)
    assert data["rows"][0]["name"] == "TCGA-49-4488-01Z-00-DX1"
    assert "MEAN" in res.output


def test_eval_clear_errors(tmp_path, shared_data):
    res = CliRunner().invoke(main, ["eval", "--task", "monuseg", "--data", str(tmp_path), "--weights",
                                    str(tmp_path / "missing")])
    assert res.exit_code != 0 and "weights file not found" in res.output
    res = CliRunner().invoke(main, ["eval", "--task", "monuseg", "--data", str(tmp_path)])
    assert res.exit_code != 0 and "images/" in res.output


SHIPPED_NOW = {"monuseg": "MODEL_CARD.md", "cxr": "MODEL_CARD_cxr.md", "hippocampus": "MODEL_CARD_hippocampus.md"}


@pytest.mark.parametrize("task", sorted(SHIPPED_NOW))
def test_shipped_model_is_packaged(task):
    p = default_weights(task)
    assert (MODEL_DIR / SHIPPED_NOW[task]).is_file()
    meta = json.loads(p.with_suffix(".json").read_text())
    sizes = [f.stat().st_size for f in load_model(task=task).files]
    assert max(sizes) <= MAX_FILE_BYTES and sum(sizes) <= MAX_MODEL_BYTES  # the package's size rule
    assert meta["dtype"] == "float16" and meta["provenance"]["task"] == task


def test_unshipped_model_says_so(no_shipped_models):
    res = CliRunner().invoke(main, ["eval", "--task", "cxr", "--data", "."])
    assert res.exit_code != 0 and "not shipped" in res.output


@pytest.mark.slow
def test_shipped_model_reproduces_model_card_on_one_tile(shared_data, tmp_path):
    """The training-time validation Dice of the first val tile (the weights' provenance, scored with
    the TTA and threshold that validation used, ``val_tta`` / ``val_threshold``; runs that predate
    those fields validated without TTA at 0.5), recomputed on this CPU."""
    bundle = load_model(task="monuseg")
    prov = bundle.provenance
    rows = {r["name"]: r for r in prov["val_rows"]}
    protocol = ["--tta" if prov.get("val_tta", False) else "--no-tta",
                "--threshold", str(prov.get("val_threshold", 0.5))]
    res = CliRunner().invoke(main, ["eval", "--task", "monuseg", "--data", str(shared_data / "monuseg"),
                                    "--names", "TCGA-49-4488-01Z-00-DX1", "--device", "cpu", *protocol,
                                    "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert got["dice"] == pytest.approx(rows["TCGA-49-4488-01Z-00-DX1"]["dice"], abs=0.005)
    assert got["iou"] == pytest.approx(rows["TCGA-49-4488-01Z-00-DX1"]["iou"], abs=0.005)


@pytest.mark.slow
def test_shipped_nuclei_model_defaults_reproduce_the_card_on_one_tile(shared_data, tmp_path):
    """With no flags (TTA on, threshold 0.4: the model's defaults) the first val tile scores what the
    committed full evaluation recorded, which is the model card's number."""
    _reproduces_first_card_row("monuseg", "monuseg_s_cpu_gonly2", shared_data / "monuseg", tmp_path)


def _reproduces_first_card_row(task: str, results: str, data: Path, tmp_path: Path, *extra: str,
                               file: str = "eval_val_cpu.json") -> None:
    """Re-score the first row of a committed full CPU evaluation with the shipped model of ``task``."""
    repo = Path(__file__).resolve().parents[1]
    card = json.loads((repo / "train" / "results" / results / file).read_text())
    first = card["rows"][0]
    res = CliRunner().invoke(main, ["eval", "--task", task, "--data", str(data), "--names", first["name"],
                                    "--device", "cpu", "--json", str(tmp_path / "r.json"), *extra])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert got["dice"] == pytest.approx(first["dice"], abs=0.005)  # another CPU may round differently
    assert got["iou"] == pytest.approx(first["iou"], abs=0.005)


@pytest.mark.slow
def test_shipped_hippocampus_model_reproduces_model_card_on_one_volume(shared_data, tmp_path):
    """The card's validation Dice of the first val volume (from the full CPU evaluation), recomputed."""
    _reproduces_first_card_row("hippocampus", "hippocampus_cpu", shared_data / "hippocampus", tmp_path,
                               "--batch-size", "32")


@pytest.mark.slow
def test_shipped_cxr_model_reproduces_model_card_on_one_image(shared_data, tmp_path):
    """The card's validation Dice of the first val radiograph (T 2, V 30, from the full CPU evaluation)."""
    _reproduces_first_card_row("cxr", "cxr_cpu", shared_data / "cxr", tmp_path)
