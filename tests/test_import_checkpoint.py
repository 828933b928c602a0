"""`cdal-fast import-checkpoint`: the authors' checkpoints in, cdal-fast weights out, and every error path."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cdal_fast.authors import (
    AuthorsCheckpointError,
    config_from_args,
    convert_generator_state,
    read_args,
    read_authors_state,
)
from cdal_fast.cli import main
from cdal_fast.network.config import ConfigError, ModelConfig, get_preset
from cdal_fast.sampling.preprocess import orient_volume, scale_volume
from cdal_fast.sampling.sampler import FixedStepSampler
from cdal_fast.weights import file_sha256, load_weights

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "authors_cdal"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"authors' fixtures not found at {FIXTURES}")


@pytest.fixture(scope="module")
def monu_args() -> dict:
    if not FIXTURES.is_dir():
        pytest.skip(f"authors' fixtures not found at {FIXTURES}")
    return read_args(FIXTURES / "monu_small.args.json")


@pytest.fixture(scope="module")
def monu_state() -> dict[str, torch.Tensor]:
    if not FIXTURES.is_dir():
        pytest.skip(f"authors' fixtures not found at {FIXTURES}")
    return torch.load(FIXTURES / "monu_small.netG.pth", weights_only=True)


def test_args_translate_per_task(monu_args):
    cfg = config_from_args(monu_args)
    assert (cfg.img_channels, cfg.mask_channels, cfg.nf, cfg.zdim, cfg.num_steps) == (3, 1, 32, 32, 4)
    assert cfg.ch_mult == (1, 1, 2) and cfg.attn_resolutions == (16, 8) and cfg.votes == 5
    assert cfg.mask_polarity == 1 and cfg.mpp == 0.5
    lung = config_from_args(read_args(FIXTURES / "lung_small.args.json"))
    assert (lung.img_channels, lung.mask_polarity, lung.votes, lung.norm_mean) == (1, -1, 30, (127.5,))
    hippo = config_from_args(read_args(FIXTURES / "hippo.args.json"))
    assert (hippo.mask_channels, hippo.volume_scaling, hippo.disc) == (3, "minmax", "small")
    with pytest.raises(AuthorsCheckpointError, match="dataset 'brats'.*--task"):
        config_from_args(monu_args | {"dataset": "brats"})
    assert config_from_args(monu_args | {"dataset": "brats"}, task="monuseg").img_channels == 3
    with pytest.raises(AuthorsCheckpointError, match="'num_channels_dae' is missing"):
        config_from_args({k: v for k, v in monu_args.items() if k != "num_channels_dae"})
    with pytest.raises(AuthorsCheckpointError, match="resblock_type='ddpm' is not supported"):
        config_from_args(monu_args | {"resblock_type": "ddpm"})


def test_checkpoint_forms_are_accepted(tmp_path, monu_args, monu_state):
    ref = read_authors_state(FIXTURES / "monu_small.netG.pth")
    bare = {k.removeprefix("module."): v for k, v in monu_state.items()}
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    torch.save({"netG_dict": monu_state, "netD_dict": {}, "epoch": 3, "args": argparse.Namespace(**monu_args),
                "optimizerG": opt.state_dict()}, tmp_path / "resume.pth")  # as their training saves it
    torch.save(bare, tmp_path / "bare.pth")
    for name in ("resume.pth", "bare.pth"):
        state = read_authors_state(tmp_path / name)
        assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)


class RunsCode:
    """A pickle that would call a function when unpickled without weights_only."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_wrong_files_are_refused_with_reasons(tmp_path, monu_args, monu_state):
    torch.save({"netG_dict": RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(AuthorsCheckpointError, match="evil.pth: not a PyTorch checkpoint of plain tensors"):
        read_authors_state(tmp_path / "evil.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(AuthorsCheckpointError, match="text.pth: not a PyTorch checkpoint"):
        read_authors_state(tmp_path / "text.pth")
    with pytest.raises(AuthorsCheckpointError, match="discriminator checkpoint"):
        read_authors_state(FIXTURES / "disc_small.netD.pth")
    torch.save({"state": {}, "param_groups": []}, tmp_path / "opt.pth")
    with pytest.raises(AuthorsCheckpointError, match="optimiser state"):
        read_authors_state(tmp_path / "opt.pth")
    cfg = config_from_args(monu_args)
    missing = dict(monu_state)
    del missing["module.all_modules.14.NIN_0.W"]
    missing["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(AuthorsCheckpointError, match=r"1 missing keys: all_modules\.14\.NIN_0\.W.*"
                                                     r"1 unexpected keys: extra\.weight"):
        convert_generator_state(missing, cfg)
    bad = dict(monu_state)
    bad["module.all_modules.2.weight"] = torch.zeros(32, 1, 3, 3)
    with pytest.raises(AuthorsCheckpointError, match=r"all_modules\.2\.weight has shape \(32, 1, 3, 3\).*"
                                                     r"needs \(32, 3, 3, 3\)"):
        convert_generator_state(bad, cfg)
    # args of another layout (the chest X-ray file) for the MoNuSeg tensors
    with pytest.raises(AuthorsCheckpointError, match="do the args belong to this checkpoint"):
        convert_generator_state(monu_state, config_from_args(read_args(FIXTURES / "lung_small.args.json")))


def test_attention_nin_matrices_become_transposed_convs(monu_state, monu_args):
    ours = convert_generator_state(monu_state, config_from_args(monu_args))
    q, k, v = (monu_state[f"module.all_modules.14.NIN_{i}.W"] for i in range(3))
    qkv = ours["down_levels.1.units.0.attn.qkv.weight"][:, :, 0, 0]
    assert torch.equal(qkv, torch.cat([q.t(), k.t(), v.t()]))


def test_config_fields_keep_old_weights_loading():
    old = {k: v for k, v in get_preset("tiny").to_dict().items() if k not in ("volume_scaling", "mask_polarity")}
    cfg = ModelConfig.from_dict(old)
    assert (cfg.volume_scaling, cfg.mask_polarity) == ("zscore", 1)
    with pytest.raises(ConfigError, match=r"mask_polarity: 0 \(allowed: 1 or -1\)"):
        get_preset("tiny", mask_polarity=0)
    with pytest.raises(ConfigError, match=r"volume_scaling: 'lpi' \(allowed: zscore, minmax\)"):
        get_preset("tiny", volume_scaling="lpi")


def test_volume_scaling_follows_the_config():
    vol = np.array([[[0.0, 10.0], [20.0, 30.0]]] * 2, dtype=np.float32)
    authors = scale_volume(vol, get_preset("hippocampus", volume_scaling="minmax"))
    np.testing.assert_allclose(authors[0, 0], [-1.0, -1.0 + 2 / 3], atol=1e-6)
    np.testing.assert_allclose(authors[0, 1], [1 / 3, 1.0], atol=1e-6)
    ours = scale_volume(vol, get_preset("hippocampus"))
    fg = np.array([10.0, 20.0, 30.0])
    assert ours[0, 0, 1] == pytest.approx((10.0 - fg.mean()) / fg.std(), abs=1e-5)


def test_negative_polarity_reports_the_minus_one_side(tiny_gen):
    flipped = FixedStepSampler(tiny_gen.__class__(tiny_gen.cfg.replace(mask_polarity=-1)), 1, 2)
    flipped.generator.load_state_dict(tiny_gen.state_dict())
    plain = FixedStepSampler(tiny_gen, 1, 2)
    g = torch.Generator().manual_seed(0)
    image, x_init = torch.randn(1, 3, 64, 64, generator=g), torch.randn(2, 1, 64, 64, generator=g)
    z, post = torch.randn(1, 2, 8, generator=g), torch.randn(1, 2, 1, 64, 64, generator=g)
    with torch.no_grad():
        p_plain, s_plain = plain(image, x_init, z, post)
        p_flip, s_flip = flipped(image, x_init, z, post)
    torch.testing.assert_close(p_flip, 1.0 - p_plain)
    torch.testing.assert_close(s_flip, s_plain)


@needs_fixtures
def test_cli_round_trip_import_segment_eval(tmp_path, shared_data):
    out = tmp_path / "w" / "monu_small"
    ckpt = FIXTURES / "monu_small.netG.pth"
    res = CliRunner().invoke(main, ["import-checkpoint", str(ckpt), "--args", str(FIXTURES / "monu_small.args.json"),
                                    "--out", str(out), "--max-file-mib", "1"])
    assert res.exit_code == 0, res.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["provenance"]["source"] == "authors"
    assert meta["provenance"]["source_sha256"] == file_sha256(ckpt)
    assert meta["parts"]  # 6 MB of float32 tensors over 1 MiB files
    bundle = load_weights(out)
    ref = convert_generator_state(read_authors_state(ckpt), bundle.config)
    assert all(torch.equal(bundle.generator.state_dict()[k], v) for k, v in ref.items())

    img = tmp_path / "tile.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(img)
    res = CliRunner().invoke(main, ["segment", str(img), "--out", str(tmp_path / "seg"), "--weights", str(out),
                                    "--mpp", "0.5", "--steps", "1", "--allow-untrained-steps", "--votes", "1",
                                    "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    mask = np.asarray(Image.open(tmp_path / "seg" / "tile.mask.png"))
    assert mask.shape == (48, 40) and set(np.unique(mask)) <= {0, 255}

    res = CliRunner().invoke(main, ["eval", "--task", "monuseg", "--data", str(shared_data / "monuseg"),
                                    "--split", "val", "--weights", str(out.with_suffix(".safetensors")),
                                    "--limit", "1", "--steps", "1", "--allow-untrained-steps", "--votes", "1",
                                    "--batch-size", "64",
                                    "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n"] == 1 and 0.0 <= result["dice"] <= 1.0


def test_cli_refuses_incomplete_args_without_writing(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"dataset": "monu"}))
    (tmp_path / "x.pth").write_bytes(b"\x00" * 16)
    res = CliRunner().invoke(main, ["import-checkpoint", str(tmp_path / "x.pth"), "--args", str(tmp_path / "a.json"),
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "is missing from the authors' arguments" in res.output
    assert not (tmp_path / "o.json").exists()


def test_lpi_orientation_flips_a_ras_volume_and_back():
    vol = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    cfg = get_preset("hippocampus", volume_orientation="LPI")
    oriented, back = orient_volume(vol, np.eye(4), cfg)  # RAS+ storage: every axis is reversed
    np.testing.assert_array_equal(oriented, vol[::-1, ::-1, ::-1])
    np.testing.assert_array_equal(back(oriented), vol)
    lpi_affine = np.diag([-1.0, -1.0, -1.0, 1.0])
    np.testing.assert_array_equal(orient_volume(vol, lpi_affine, cfg)[0], vol)
    with pytest.raises(ValueError, match="needs volumes reoriented to LPI.*affine"):
        orient_volume(vol, None, cfg)
    with pytest.raises(ConfigError, match=r"volume_orientation: 'XYZ' \(allowed: 'native' or three axis codes"):
        get_preset("hippocampus", volume_orientation="XYZ")


def test_predict_volume_runs_an_lpi_model_in_lpi_space():
    from cdal_fast.network.generator import Generator
    from cdal_fast.sampling.inference import PatchRunner, predict_volume

    native = get_preset("tiny", img_channels=1, mask_channels=3, image_size=32, norm_mean=(0.0,), norm_std=(1.0,))
    torch.manual_seed(0)
    gen = Generator(native).eval()
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    lpi = native.replace(volume_orientation="LPI")
    gen_lpi = Generator(lpi).eval()
    gen_lpi.load_state_dict(gen.state_dict())
    vol = np.random.default_rng(1).normal(size=(32, 32, 32)).astype(np.float32)

    def run(g, v, affine=None):
        return predict_volume(v, g.cfg, PatchRunner(FixedStepSampler(g, 1, 1), batch_size=32), affine=affine)

    expected = run(gen, np.ascontiguousarray(vol[::-1, ::-1, ::-1])).numpy()[::-1, ::-1, ::-1]
    np.testing.assert_array_equal(run(gen_lpi, vol, np.eye(4)).numpy(), expected)
