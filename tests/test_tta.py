"""Test-time augmentation of the votes (cdal_fast.sampling.dihedral, FixedStepSampler(tta=True)) on every backend."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cdal_fast.cli import main
from cdal_fast.network.config import ConfigError, get_preset
from cdal_fast.network.generator import Generator
from cdal_fast.runtime.backends import build_sampler
from cdal_fast.runtime.export import ExportableSampler
from cdal_fast.runtime.onnx_cache import cached_onnx
from cdal_fast.runtime.onnx_tensorrt import OnnxSampler
from cdal_fast.sampling.dihedral import DIHEDRAL_ORDER, SHAPE_KEEPING, apply_dihedral, invert_dihedral, vote_codes
from cdal_fast.sampling.inference import PatchRunner
from cdal_fast.sampling.sampler import FixedStepSampler, draw_noise, generators_from_seed, sample
from cdal_fast.weights import save_weights

from .conftest import perturbed

# A 2x2 grid [[a, b], [c, d]] = [[1, 2], [3, 4]] under each code, worked out by hand from the
# documented order (rotations counter-clockwise; hflip mirrors left-right first).
HAND = {0: [[1, 2], [3, 4]], 1: [[2, 4], [1, 3]], 2: [[4, 3], [2, 1]], 3: [[3, 1], [4, 2]],
        4: [[2, 1], [4, 3]], 5: [[1, 3], [2, 4]], 6: [[3, 4], [1, 2]], 7: [[4, 2], [3, 1]]}


def _gen(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return perturbed(Generator(get_preset("tiny")), seed=seed).eval()


def _noise(s: FixedStepSampler, b: int, h: int, w: int, seed: int = 0):
    return draw_noise(s.num_steps, s.votes, s.mask_channels, s.nz, h, w, generators_from_seed(seed, b))


def test_dihedral_codes_match_hand_values_and_invert():
    grid = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    for code, want in HAND.items():
        assert apply_dihedral(grid, code).tolist() == want, code
    rect = torch.arange(12.0).reshape(2, 3, 2)  # non-square: every code inverts, even the shape-swapping ones
    for code in DIHEDRAL_ORDER:
        assert torch.equal(invert_dihedral(apply_dihedral(rect, code), code), rect)
    # the literal orders inside vote_codes (TorchScript reads no globals) are the documented constants
    assert vote_codes(10, True) == [*DIHEDRAL_ORDER, 0, 1]
    assert vote_codes(5, False) == [*SHAPE_KEEPING, 0]
    assert all(apply_dihedral(rect, c).shape == rect.shape for c in SHAPE_KEEPING)


def test_one_vote_is_the_identity_transform():
    gen = _gen()
    plain, tta = FixedStepSampler(gen, votes=1), FixedStepSampler(gen, votes=1, tta=True)
    img = torch.randn(2, 3, 64, 64)
    n = _noise(plain, 2, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(plain(img, n.x_init, n.z, n.post),
                                                     tta(img, n.x_init, n.z, n.post)))


class _Pointwise(nn.Module):
    """A generator whose every operation is per pixel, hence exactly equivariant to flips and rotations."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = get_preset("tiny").replace(votes=8)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image[:, :1] * 0.3 - image[:, 1:2] * 0.2

    def denoise(self, x: torch.Tensor, k: torch.Tensor, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.7 * x + c + 0.05 * z.mean(1).view(-1, 1, 1, 1) + 0.1 * k.view(-1, 1, 1, 1))


@pytest.mark.parametrize("shape", [(32, 32), (16, 24)])
def test_equivariant_generator_gives_the_plain_result(shape):
    """The noise is transformed with the image, so TTA of an equivariant model changes nothing."""
    toy = _Pointwise()
    plain, tta = FixedStepSampler(toy), FixedStepSampler(toy, tta=True)
    img = torch.randn(3, 3, *shape)
    n = _noise(plain, 3, *shape)
    with torch.no_grad():
        p0, s0 = plain(img, n.x_init, n.z, n.post)
        p1, s1 = tta(img, n.x_init, n.z, n.post)
    torch.testing.assert_close(p1, p0, rtol=0, atol=1e-6)
    torch.testing.assert_close(s1, s0, rtol=0, atol=1e-6)


def test_tta_changes_a_real_model_and_is_batch_size_invariant():
    gen = _gen(1)
    patches = torch.randn(3, 3, 64, 64)
    keys = [(0, 0), (0, 64), (64, 0)]
    plain = PatchRunner(FixedStepSampler(gen), batch_size=3, seed=5)(patches, keys)
    runs = [PatchRunner(FixedStepSampler(gen, tta=True), batch_size=bs, seed=5)(patches, keys) for bs in (1, 3)]
    assert (runs[0] - plain).abs().max() > 1e-3  # the votes really see other views
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=1e-5, atol=1e-6)


BACKENDS_ON_CPU = ["torchscript"] + (["fused"] if importlib.util.find_spec("cdal_fast._C") else [])


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_backend_parity_with_tta(backend):
    gen = _gen(2)
    img = torch.randn(2, 3, 64, 64)
    ref = sample(build_sampler(gen, None, None, "eager", tta=True), img, seed=3)
    got = sample(build_sampler(gen, None, None, backend, tta=True), img, seed=3)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_onnx_graph_with_tta_matches_eager_and_is_cached_apart(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("CDAL_FAST_CACHE", str(tmp_path))
    gen = _gen(3)
    sha = "ab" * 32
    tta_path = cached_onnx(gen, None, None, sha, tta=True)
    assert tta_path.name.endswith("-tta.onnx")  # never mistaken for the plain graph of the same weights
    ort = OnnxSampler(tta_path, gen, sha)
    # a config differing only in its inference default (tta) is the same network: the graph loads for it
    other_default = Generator(gen.cfg.replace(tta=True))
    other_default.load_state_dict(gen.state_dict())
    assert ort.tta and OnnxSampler(tta_path, other_default, sha).tta
    eager = FixedStepSampler(gen, tta=True)
    img = torch.randn(2, 3, 64, 64)
    n = _noise(eager, 2, 64, 64, seed=1)
    with torch.no_grad():
        ref = eager(img, n.x_init, n.z, n.post)
    for a, b in zip(ort(img, n.x_init, n.z, n.post), ref):
        assert (a - b).abs().max().item() <= 1e-4


def test_whole_sampler_torchscript_export_with_tta():
    gen = _gen(4)
    module = ExportableSampler(gen, tta=True).eval()
    scripted = torch.jit.script(module)
    img = torch.rand(1, 3, 64, 32) * 255  # non-square: the shape-keeping transforms
    seed = torch.tensor(9, dtype=torch.int64)
    with torch.no_grad():
        for a, b in zip(scripted(img, seed), module(img, seed)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        plain = ExportableSampler(gen).eval()(img, seed)[0]
    assert scripted.tta and (module(img, seed)[0] - plain).abs().max() > 1e-3


def test_config_tta_must_be_a_boolean():
    with pytest.raises(ConfigError, match="field tta: 'yes' is not a boolean"):
        get_preset("tiny", tta="yes")


def test_eval_follows_the_model_default_and_the_flags(tmp_path):
    """One 64x64 image scored by the whole-image protocol (cxr): the model's tta default, then --no-tta."""
    from PIL import Image

    gen = _gen(5)
    tta_model = Generator(gen.cfg.replace(tta=True))
    tta_model.load_state_dict(gen.state_dict())
    save_weights(tmp_path / "w", tta_model)
    for folder in ("images", "masks"):
        (tmp_path / "d" / folder).mkdir(parents=True)
    rng = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (64, 64, 3), generator=rng, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "d" / "images" / "a.png")
    Image.fromarray((pixels[..., 0] > 128).astype("uint8") * 255).save(tmp_path / "d" / "masks" / "a.png")
    base = ["eval", "--task", "cxr", "--data", str(tmp_path / "d"), "--weights", str(tmp_path / "w.safetensors"),
            "--device", "cpu"]
    dice = {}
    for flag in ("", "--no-tta"):
        out = tmp_path / f"r{flag}.json"
        res = CliRunner().invoke(main, [*base, "--json", str(out), *([flag] if flag else [])])
        assert res.exit_code == 0, res.output
        data = json.loads(out.read_text())
        assert data["tta"] is (flag == "") and ("TTA on" in res.output) is (flag == "")
        dice[flag] = data["dice"]
    assert dice[""] != dice["--no-tta"]


def test_segment_records_tta_and_stays_batch_size_invariant(tmp_path):
    """The model's default (on) reaches segment's sampler; batch 1 and batch 4 give the same mask with it."""
    from PIL import Image

    gen = _gen(6)
    tta_model = Generator(gen.cfg.replace(tta=True))
    tta_model.load_state_dict(gen.state_dict())
    save_weights(tmp_path / "w", tta_model, dtype=torch.float32)
    rng = torch.Generator().manual_seed(1)
    Image.fromarray(torch.randint(0, 256, (96, 128, 3), generator=rng, dtype=torch.uint8).numpy()).save(
        tmp_path / "a.png")
    masks, recorded = [], []
    for bs, flag in ((1, ""), (4, "")):
        out = tmp_path / f"o{bs}{flag}"
        res = CliRunner().invoke(main, ["segment", str(tmp_path / "a.png"), "--out", str(out), "--weights",
                                        str(tmp_path / "w.safetensors"), "--mpp", "0.5", "--workers", "0",
                                        "--batch-size", str(bs), "--tile-overlap", "16", "--no-nuclei", "-q",
                                        "--save-prob", *([flag] if flag else [])])
        assert res.exit_code == 0, res.output
        recorded.append(json.loads((out / "a.json").read_text())["model"]["tta"])
        masks.append(np.asarray(Image.open(next(out.glob("a.prob*")))))
    assert recorded == [True, True]
    assert np.array_equal(masks[0], masks[1])
