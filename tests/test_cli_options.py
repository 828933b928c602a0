"""CLI option checks (issue 17 item 9): every numeric option is range-checked before any work,
and a T other than the model's trained one needs --allow-untrained-steps."""

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


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("w")
    torch.manual_seed(0)
    save_weights(folder / "tiny", perturbed(Generator(get_preset("tiny"))).eval(), dtype=torch.float32)
    return folder / "tiny.safetensors"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    return path


# (command, option, bad value): each must be refused by click (exit 2) naming the option.
BAD_OPTIONS = [
    ("segment", "--votes", "0"), ("segment", "--votes", "1001"), ("segment", "--steps", "0"),
    ("segment", "--batch-size", "0"), ("segment", "--workers", "-1"), ("segment", "--seed", "-3"),
    ("segment", "--tile-overlap", "-1"), ("segment", "--mpp", "0"), ("segment", "--mpp", "nan"),
    ("segment", "--mpp", "inf"), ("segment", "--mpp", "-0.5"),
    ("segment", "--positivity-thresholds", "0.4,0.2,0.6"), ("segment", "--positivity-thresholds", "0.2,0.4"),
    ("segment", "--positivity-thresholds", "0,0.4,0.6"), ("segment", "--positivity-thresholds", "a,b,c"),
    ("segment", "--cell-ring", "-1"), ("segment", "--cell-ring", "nan"), ("segment", "--cell-ring", "21"),
    ("eval", "--votes", "0"), ("eval", "--steps", "0"), ("eval", "--batch-size", "0"), ("eval", "--limit", "0"),
    ("eval", "--seed", "-1"),
    ("export", "--votes", "0"), ("export", "--steps", "-2"), ("export", "--batch", "0"), ("export", "--size", "4"),
    ("train", "--max-steps", "0"), ("train", "--max-minutes", "0"), ("train", "--max-minutes", "nan"),
    ("train", "--seed", "-1"),
]


def _base_args(command: str, tmp_path: Path, image: Path) -> list[str]:
    config = tmp_path / "train.json"
    config.write_text("{}")
    return {
        "segment": ["segment", str(image), "--out", str(tmp_path / "out")],
        "eval": ["eval", "--task", "monuseg", "--data", str(tmp_path)],
        "export": ["export", "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
        "train": ["train", "--config", str(config)],
    }[command]


@pytest.mark.parametrize(("command", "option", "value"), BAD_OPTIONS)
def test_bad_numeric_option_is_a_usage_error(tmp_path, image, command, option, value):
    res = CliRunner().invoke(main, [*_base_args(command, tmp_path, image), option, value])
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{option}'" in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()  # no work started


def test_untrained_steps_need_the_flag_and_are_recorded(tmp_path, image, tiny_weights):
    """tiny is trained with T=2: --steps 3 is refused, then allowed and recorded with the flag."""
    args = ["segment", str(image), "--weights", str(tiny_weights), "--mpp", "0.5", "--workers", "0", "-q",
            "--votes", "1"]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a"), "--steps", "3"])
    assert res.exit_code == 2 and "--allow-untrained-steps" in res.output
    assert "differs from the 2 reverse steps" in res.output
    assert not (tmp_path / "a").exists()
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--steps", "3", "--allow-untrained-steps"])
    assert res.exit_code == 0, res.output
    model = json.loads((tmp_path / "b" / "img.json").read_text())["model"]
    assert (model["steps"], model["trained_steps"], model["untrained_steps"]) == (3, 2, True)
    assert model["weights_verified"] is True
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "c"), "--steps", "2"])
    assert res.exit_code == 0, res.output  # the trained T needs no flag
    assert json.loads((tmp_path / "c" / "img.json").read_text())["model"]["untrained_steps"] is False


def test_help_names_the_untrained_steps_flag():
    for command in ("segment", "eval", "export"):
        res = CliRunner().invoke(main, [command, "--help"])
        assert "--allow-untrained-steps" in res.output and "untrained_steps: true" in res.output, command


def test_stain_options_reach_the_slide_and_a_missing_stain_reference_is_named(tmp_path, image, tiny_weights):
    out = tmp_path / "out"
    args = ["segment", str(image), "--out", str(out), "--weights", str(tiny_weights), "--mpp", "0.5", "--workers", "0",
            "--backend", "eager", "-q"]
    res = CliRunner().invoke(main, [*args, "--stain", "h-dab", "--positivity-thresholds", "0.1,0.3,0.5",
                                    "--positivity-compartment", "cell", "--cell-ring", "3", "--no-report"])
    assert res.exit_code == 0, res.output
    opts = json.loads((out / "img.json").read_text())["options"]
    assert opts["stain"] == "h-dab" and opts["positivity_thresholds"] == [0.1, 0.3, 0.5]
    assert opts["positivity_compartment"] == "cell" and opts["cell_ring_um"] == 3.0 and opts["report"] is False
    assert not (out / "report.html").exists()
    res = CliRunner().invoke(main, [*args[:3], str(tmp_path / "out2"), *args[4:], "--stain-normalise"])
    assert res.exit_code == 2 and "stain reference" in res.output and "stain_reference.py" in res.output
    res = CliRunner().invoke(main, ["segment", str(image), "--out", str(out), "--stain", "he"])
    assert res.exit_code == 2 and "--stain" in res.output
    res = CliRunner().invoke(main, ["eval", "--task", "monuseg", "--data", str(tmp_path),
                                    "--weights", str(tiny_weights), "--stain-normalise"])
    assert res.exit_code == 2 and "stain reference" in res.output
