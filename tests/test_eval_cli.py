"""`cdal-fast eval` and the shipped model."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cdal_fast.cli import main
from cdal_fast.metrics import dice_iou, per_class_dice_iou
from cdal_fast.models import MODEL_DIR, default_weights, load_model
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
    assert data["n"] == 1 and 0 <= data["dice"] <= 1 and 0 <= data["iou"] <= data["dice"]
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
    files = [p.with_suffix(".safetensors")] + [MODEL_DIR / part["file"] for part in meta.get("parts", [])]
    sizes = [f.stat().st_size for f in files]
    assert max(sizes) <= 16 * 2**20 and sum(sizes) <= 32 * 2**20  # the package's size rule
    assert meta["dtype"] == "float16" and meta["provenance"]["task"] == task


def test_unshipped_model_says_so(tmp_path, monkeypatch):
    import cdal_fast.models

    monkeypatch.setattr(cdal_fast.models, "MODEL_DIR", tmp_path)  # a build without the weights
    res = CliRunner().invoke(main, ["eval", "--task", "cxr", "--data", "."])
    assert res.exit_code != 0 and "not shipped" in res.output


@pytest.mark.slow
def test_shipped_model_reproduces_model_card_on_one_tile(shared_data, tmp_path):
    """The model card's validation Dice of the first val tile, recomputed on this CPU."""
    bundle = load_model(task="monuseg")
    rows = {r["name"]: r for r in bundle.provenance["val_rows"]}
    res = CliRunner().invoke(main, ["eval", "--task", "monuseg", "--data", str(shared_data / "monuseg"),
                                    "--names", "TCGA-49-4488-01Z-00-DX1", "--device", "cpu",
                                    "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert got["dice"] == pytest.approx(rows["TCGA-49-4488-01Z-00-DX1"]["dice"], abs=0.005)
    assert got["iou"] == pytest.approx(rows["TCGA-49-4488-01Z-00-DX1"]["iou"], abs=0.005)


@pytest.mark.slow
def test_shipped_hippocampus_model_reproduces_model_card_on_one_volume(shared_data, tmp_path):
    """The card's validation Dice of the first val volume (from the full CPU evaluation), recomputed."""
    repo = Path(__file__).resolve().parents[1]
    card = json.loads((repo / "train" / "results" / "hippocampus_cpu" / "eval_val_cpu.json").read_text())
    first = card["rows"][0]
    res = CliRunner().invoke(main, ["eval", "--task", "hippocampus", "--data", str(shared_data / "hippocampus"),
                                    "--names", first["name"], "--batch-size", "32", "--device", "cpu",
                                    "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert got["dice"] == pytest.approx(first["dice"], abs=0.005)  # another CPU may round differently
    assert got["iou"] == pytest.approx(first["iou"], abs=0.005)


@pytest.mark.slow
def test_shipped_cxr_model_reproduces_model_card_on_one_image(shared_data, tmp_path):
    """The card's validation Dice of the first val radiograph (T 2, V 30, from the full CPU evaluation)."""
    repo = Path(__file__).resolve().parents[1]
    card = json.loads((repo / "train" / "results" / "cxr_cpu" / "eval_val_cpu.json").read_text())
    first = card["rows"][0]
    res = CliRunner().invoke(main, ["eval", "--task", "cxr", "--data", str(shared_data / "cxr"),
                                    "--names", first["name"], "--device", "cpu",
                                    "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert got["dice"] == pytest.approx(first["dice"], abs=0.005)
    assert got["iou"] == pytest.approx(first["iou"], abs=0.005)
