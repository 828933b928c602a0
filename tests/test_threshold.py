"""The binary decision threshold as a model default (issue 24, lever 5): config, decoding, segment, eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cdal_fast.cli import main
from cdal_fast.network.config import INFERENCE_FIELDS, ConfigError, get_preset, load_config
from cdal_fast.network.generator import Generator
from cdal_fast.sampling.decode import MaskChannels, object_pixels, prob_to_u8, to_labels, u8_cutoff, u8_to_mask
from cdal_fast.weights import save_weights

from .conftest import perturbed

SHIPPED_MONUSEG = Path(__file__).resolve().parents[1] / "cdal_fast" / "models" / "monuseg.json"


def test_threshold_moves_the_decision_of_probabilities_and_of_the_stored_plane():
    p = torch.tensor([0.0, 0.3, 0.39, 0.4, 0.45, 0.5, 0.7, 1.0]).reshape(1, 1, -1)
    low, high = MaskChannels(1, 0.4), MaskChannels(1, 0.6)
    assert to_labels(p, low).tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    assert to_labels(p, high).tolist() == [[0, 0, 0, 0, 0, 0, 1, 1]]
    plane = prob_to_u8(p, low)  # the stored plane does not depend on the threshold
    assert torch.equal(plane, prob_to_u8(p, high))
    assert (u8_to_mask(plane.numpy(), low) > 0).tolist() == (to_labels(p, low) > 0).tolist()
    assert object_pixels(plane, low) == 5 and object_pixels(plane, high) == 2


def test_stored_plane_cutoff_is_within_half_a_quantum_of_the_threshold():
    assert u8_cutoff(0.5) == 128  # exactly "P >= 0.5" (round half to even), as before thresholds were settable
    assert u8_cutoff(0.4) == 102 and u8_cutoff(1e-4) == 1
    for t in np.linspace(0.01, 0.99, 99):
        p = torch.linspace(0, 1, 4097).reshape(1, 1, -1)
        kind = MaskChannels(1, float(t))
        disagree = (u8_to_mask(prob_to_u8(p, kind).numpy(), kind) > 0) != (to_labels(p, kind).numpy() > 0)
        assert np.all(np.abs(p.numpy()[disagree[None]] - t) <= 0.5 / 255 + 1e-7)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            u8_cutoff(bad)


@pytest.mark.parametrize("t", [0.2, 0.4, 0.5, 0.6, 0.77])
def test_mask_cutoff_equals_the_nucleus_rule_on_the_stored_plane(t):
    """Slide masks (u8 >= u8_cutoff) and nucleus foregrounds (float32 u8 / 255 >= t) agree at equal thresholds."""
    from cdal_fast.nuclei.params import NucleiParams
    from cdal_fast.nuclei.separate import foreground

    plane = np.arange(256, dtype=np.uint8).reshape(16, 16)
    mask = u8_to_mask(plane, MaskChannels(1, t)) > 0
    nuclei = foreground(plane.astype(np.float32) / 255, NucleiParams(prob_threshold=t))
    assert np.array_equal(mask, nuclei)


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.2, math.nan, "0.4", True])
def test_config_refuses_a_threshold_outside_the_open_unit_interval(bad):
    with pytest.raises(ConfigError, match="field threshold"):
        get_preset("tiny", threshold=bad)


def test_threshold_is_an_inference_field_and_the_shipped_nuclei_model_carries_the_validated_one():
    assert "threshold" in INFERENCE_FIELDS
    assert "threshold" not in get_preset("tiny", threshold=0.3).architecture_dict()  # caches stay valid
    cfg = load_config(SHIPPED_MONUSEG)
    assert cfg.threshold == 0.4 and cfg.tta  # chosen on the val split (train/results/monuseg_inference_levers)


def _tiny_weights(folder: Path, threshold: float) -> Path:
    torch.manual_seed(3)
    gen = perturbed(Generator(get_preset("tiny", threshold=threshold)), seed=3).eval()
    save_weights(folder / "w", gen, dtype=torch.float32)
    return folder / "w.safetensors"


def _image(path: Path) -> Path:
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path)
    return path


def _segment(image: Path, weights: Path, out: Path, *flags: str) -> tuple[np.ndarray, np.ndarray, dict]:
    res = CliRunner().invoke(main, ["segment", str(image), "--out", str(out), "--weights", str(weights), "--mpp",
                                    "0.5", "--workers", "0", "--tile-overlap", "16", "-q", "--save-prob", *flags])
    assert res.exit_code == 0, res.output
    mask = np.asarray(Image.open(out / "a.mask.png"))
    prob = np.asarray(Image.open(out / "a.prob.png"))
    return mask, prob, json.loads((out / "a.json").read_text())


def test_segment_decodes_at_the_model_threshold_unless_told_otherwise(tmp_path):
    weights = _tiny_weights(tmp_path, 0.45)
    image = _image(tmp_path / "a.png")
    mask, prob, info = _segment(image, weights, tmp_path / "default")
    assert info["model"]["threshold"] == 0.45
    assert np.array_equal(mask > 0, prob >= u8_cutoff(0.45))
    mask_hi, prob_hi, info_hi = _segment(image, weights, tmp_path / "high", "--threshold", "0.55")
    assert np.array_equal(prob_hi, prob)  # the probabilities do not depend on the threshold
    assert info_hi["model"]["threshold"] == 0.55
    assert np.array_equal(mask_hi > 0, prob >= u8_cutoff(0.55))
    assert (mask > 0).sum() > (mask_hi > 0).sum() > 0  # the tiny model's map straddles both thresholds
    # nuclei keep their own threshold (tuned for AJI), whatever the mask's
    assert info["nuclei"]["params"]["prob_threshold"] == info_hi["nuclei"]["params"]["prob_threshold"] == 0.5
    _, _, info_own = _segment(image, weights, tmp_path / "own", "--threshold", "0.55", "--nuclei-threshold", "0.3")
    assert info_own["nuclei"]["params"]["prob_threshold"] == 0.3


def test_segment_refuses_a_threshold_outside_the_open_unit_interval(tmp_path):
    res = CliRunner().invoke(main, ["segment", str(_image(tmp_path / "a.png")), "--out", str(tmp_path / "o"),
                                    "--threshold", "1"])
    assert res.exit_code == 2 and "--threshold" in res.output


def test_eval_scores_at_the_model_threshold_and_records_it(tmp_path):
    weights = _tiny_weights(tmp_path, 0.45)
    for folder in ("images", "masks"):
        (tmp_path / "d" / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "d" / "images" / "a.png")
    Image.fromarray((pixels[..., 0] > 128).astype(np.uint8) * 255).save(tmp_path / "d" / "masks" / "a.png")
    scores = {}
    for flags in ((), ("--threshold", "0.2")):
        out = tmp_path / f"r{len(flags)}.json"
        res = CliRunner().invoke(main, ["eval", "--task", "cxr", "--data", str(tmp_path / "d"), "--weights",
                                        str(weights), "--device", "cpu", "--json", str(out), *flags])
        assert res.exit_code == 0, res.output
        data = json.loads(out.read_text())
        expected = 0.2 if flags else 0.45
        assert data["threshold"] == expected and f"threshold {expected:g}" in res.output
        scores[flags] = data["dice"]
    assert scores[()] != scores[("--threshold", "0.2")]


def test_python_decode_mask_takes_the_model_threshold_when_given_its_config():
    from cdal_fast.sampling.sampler import decode_mask

    prob = torch.tensor([0.3, 0.42, 0.5, 0.9]).reshape(1, 1, 1, 4)
    assert decode_mask(prob).tolist() == [[[0, 0, 1, 1]]]  # no config: 0.5
    assert decode_mask(prob, get_preset("tiny", threshold=0.4)).tolist() == [[[0, 1, 1, 1]]]
