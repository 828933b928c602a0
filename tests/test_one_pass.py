"""One-pass (distilled) models: the sampler, every runtime path, the student's initialisation, the
distillation loss and run (resume bit for bit), the teacher-target pooling, and segment end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from cdal_fast.cli import main
from cdal_fast.job import JobError, SegmentRequest, resolve_segment_job
from cdal_fast.models import load_model
from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator
from cdal_fast.runtime.backends import build_sampler
from cdal_fast.runtime.onnx_export import export_onnx
from cdal_fast.runtime.onnx_tensorrt import OnnxSampler
from cdal_fast.sampling.one_pass import UNCERTAINTY_MAX, OnePassSampler, one_pass_head, sampler_for
from cdal_fast.sampling.sampler import FixedStepSampler, sample
from cdal_fast.training.checkpoint import save_checkpoint
from cdal_fast.training.distill import (
    INITIAL_UNCERTAINTY,
    DistillConfig,
    Distiller,
    distill_losses,
    student_from_teacher,
)
from cdal_fast.weights import load_weights, save_weights

from .conftest import perturbed
from .slides import write_ome_pyramid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from distill_targets import tile_targets  # noqa: E402


@pytest.fixture
def student() -> Generator:
    torch.manual_seed(0)
    return perturbed(Generator(get_preset("tiny", one_pass=True, votes=1))).eval()


def test_one_pass_sampler_ignores_noise_and_gives_maps_in_range(student):
    s = sampler_for(student)
    assert isinstance(s, OnePassSampler) and (s.num_steps, s.votes, s.tta) == (1, 1, False)
    img = torch.randn(2, 3, 64, 64)
    a, b = sample(s, img, seed=0), sample(s, img, seed=123)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # no noise enters
    assert a[0].shape == a[1].shape == (2, 1, 64, 64)
    assert 0 <= a[0].min() and a[0].max() <= 1 and 0 <= a[1].min() and a[1].max() <= UNCERTAINTY_MAX
    assert a[1].std() > 0  # the uncertainty is a map, not a constant


def test_one_pass_runs_through_every_runtime_alike(student, tmp_path):
    img = torch.randn(2, 3, 64, 64)
    ref = sample(build_sampler(student, 1, 1, "eager"), img)
    for s in (build_sampler(student, 1, 1, "torchscript"), OnnxSampler(export_onnx(student, tmp_path / "s.onnx", 1, 1),
                                                                         student)):
        out = sample(s, img)
        torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=0)


def test_sampler_choice_and_what_a_one_pass_model_refuses(student, tiny_gen):
    assert isinstance(sampler_for(tiny_gen, 2, 2), FixedStepSampler)
    for kwargs in ({"steps": 4}, {"votes": 5}, {"tta": True}):
        with pytest.raises(ValueError, match="one-pass model"):
            sampler_for(student, **kwargs)
    with pytest.raises(ValueError, match="diffusion model"):
        OnePassSampler(tiny_gen)


def test_job_of_a_one_pass_model_has_one_step_and_vote(student, tmp_path):
    save_weights(tmp_path / "s", student, dtype=torch.float32)
    bundle = load_weights(tmp_path / "s")
    job = resolve_segment_job(SegmentRequest(weights=str(tmp_path / "s")), bundle, gpu=False)
    assert (job.sampler.steps, job.sampler.votes, job.sampler.tta, job.sampler.untrained_steps) == (1, 1, False,
                                                                                                    False)
    for flag, req in (("--votes", SegmentRequest(votes=5)), ("--tta", SegmentRequest(tta=True))):
        with pytest.raises(JobError, match="one-pass model") as info:
            resolve_segment_job(req, bundle, gpu=False)
        assert info.value.param == flag


def test_student_starts_as_the_teachers_first_step(tiny_gen):
    """Every weight copied: the probability map at initialisation is the teacher's x0 prediction at the
    first reverse step from a zero mask and latent; the uncertainty map starts flat at its initial level."""
    s = student_from_teacher(tiny_gen, "tiny_fast", 0.4).eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        teacher_x0 = one_pass_head(tiny_gen, img, 1, tiny_gen.cfg.nz, tiny_gen.cfg.num_steps - 1)
        prob, unc = OnePassSampler(s)(img, None, None, None)
    torch.testing.assert_close(prob, ((teacher_x0 + 1) / 2).clamp(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(unc, torch.full_like(unc, INITIAL_UNCERTAINTY), atol=1e-6, rtol=0)
    assert s.cfg.one_pass and s.cfg.threshold == 0.4 and s.cfg.votes == 1


def test_distill_loss_is_zero_only_at_the_targets():
    dc = DistillConfig(targets="", data="", out="", w_gt=1.0)
    t_prob = torch.rand(2, 1, 8, 8)
    target = torch.cat([t_prob, 0.1 * torch.ones(2, 1, 8, 8), (t_prob > 0.5).float()], 1)
    exact = distill_losses(t_prob, 0.1 * torch.ones(2, 1, 8, 8), target, dc)
    off = distill_losses(t_prob.flip(-1), 0.2 * torch.ones(2, 1, 8, 8), target, dc)
    assert exact["unc"] == 0 and off["unc"] > 0.09
    assert off["bce"] > exact["bce"] and off["dice"] > exact["dice"] and off["loss"] > exact["loss"]
    assert exact["gt"] > 0  # soft targets are not the binary truth


def _targets_folder(folder: Path, tiles: int = 2, size: int = 96) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(tiles):
        prob = torch.from_numpy(rng.random((1, size, size), dtype=np.float32))
        save_file({"image": torch.from_numpy(rng.integers(0, 255, (3, size, size), dtype=np.uint8)),
                   "prob": prob.half(), "std": (0.2 * prob).half(), "mask": (prob > 0.5).to(torch.uint8)},
                  str(folder / f"t{i}.safetensors"))
        names.append(f"t{i}")
    (folder / "targets.json").write_text(json.dumps({"tiles": names}))
    return folder


def _labelled_folder(folder: Path, size: int = 128) -> Path:
    from PIL import Image

    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / "images" / "v.png")
    Image.fromarray((rng.random((size, size)) > 0.7).astype(np.uint8) * 255).save(folder / "masks" / "v.png")
    (folder / "split.json").write_text(json.dumps({"val": ["v"]}))
    return folder


def test_distillation_exports_a_student_and_resumes_bit_for_bit(tmp_path, tiny_gen, one_torch_thread):
    save_weights(tmp_path / "teacher", tiny_gen, dtype=torch.float32)
    common = {"targets": str(_targets_folder(tmp_path / "targets")), "data": str(_labelled_folder(tmp_path / "data")),
              "teacher": str(tmp_path / "teacher"), "name": "tiny_fast", "batch_size": 2, "val_every": 2,
              "val_at_start": False, "ckpt_every": 2, "log_every": 1, "warmup": 1}
    straight = Distiller(DistillConfig(**common, out=str(tmp_path / "a"), max_steps=4))
    straight.fit()
    first = Distiller(DistillConfig(**common, out=str(tmp_path / "b"), max_steps=4))
    first.train_step()
    first.train_step()
    save_checkpoint(tmp_path / "b" / "last.pt", first.state_dict())  # a run stopped after step 2
    second = Distiller(DistillConfig(**common, out=str(tmp_path / "b"), max_steps=4))
    assert second.resume() and second.step == 2
    second.fit()
    for (name, a), b in zip(straight.ema.state_dict().items(), second.ema.state_dict().values()):
        assert torch.equal(a, b), name
    best = load_weights(tmp_path / "a" / "best")
    assert best.config.one_pass and best.provenance["teacher_sha256"] == load_weights(tmp_path / "teacher").sha256
    out = sample(build_sampler(best.generator, 1, 1, "eager"), torch.randn(1, 3, 64, 64))
    assert out[0].shape == (1, 1, 64, 64)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_dice" in r] == [2, 4] and all("loss" in r for r in log if "lr" in r)


def test_a_resumed_dice_aji_run_keeps_its_best_score(tmp_path, tiny_gen, one_torch_thread):
    """The selection score and its rule travel in the checkpoint: a resumed Dice + AJI run must not
    export a worse student over its best (it once reset the score on every resume)."""
    save_weights(tmp_path / "teacher", tiny_gen, dtype=torch.float32)
    common = {"targets": str(_targets_folder(tmp_path / "targets")), "data": str(_labelled_folder(tmp_path / "data")),
              "teacher": str(tmp_path / "teacher"), "name": "tiny_fast", "batch_size": 2, "warmup": 1,
              "out": str(tmp_path / "o"), "select": "dice+aji"}
    first = Distiller(DistillConfig(**common, max_steps=2))
    first.best_score = 1.25
    save_checkpoint(tmp_path / "o" / "last.pt", first.state_dict())
    again = Distiller(DistillConfig(**common, max_steps=2))
    assert again.resume() and again.best_score == 1.25
    other_rule = Distiller(DistillConfig(**(common | {"select": "dice"}), max_steps=2))
    assert other_rule.resume() and other_rule.best_score == -1.0


def test_teacher_targets_pool_the_votes_of_overlapping_windows():
    """A pixel covered by several windows gets the mean and std of all their votes: the windows' mean
    of means, and sqrt(mean of (std^2 + mean^2) - mean^2)."""
    cfg = get_preset("tiny")  # 64-px windows at a stride of 32 over a 128-px tile: 3 x 3 windows

    def window_maps(y: int, x: int) -> tuple[float, float]:
        return 0.1 + 0.002 * y + 0.001 * x, 0.01 + 0.0005 * (y + x)

    class Fixed(torch.nn.Module):
        num_steps, votes, mask_channels, nz = 1, 2, 1, 8

        def forward(self, image, x_init, z, post):  # each window reads its own corner from the image
            out = [torch.tensor(window_maps(int(w[0, 0, 0]), int(w[1, 0, 0]))) for w in image]
            m = torch.stack([o[0] for o in out]).view(-1, 1, 1, 1).expand(-1, 1, 64, 64)
            s = torch.stack([o[1] for o in out]).view(-1, 1, 1, 1).expand(-1, 1, 64, 64)
            return m, s

    size = 128
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.stack([ys, xs, xs]).float()  # channel 0: row, channel 1: column
    mean, std = tile_targets(image, Fixed(), cfg, seed=0, tile_index=0, batch=4)
    for py, px in ((10, 10), (40, 70), (100, 50)):
        cover = [(y, x) for y in (0, 32, 64) for x in (0, 32, 64) if y <= py < y + 64 and x <= px < x + 64]
        m = torch.tensor([window_maps(y, x)[0] for y, x in cover], dtype=torch.float64)
        s = torch.tensor([window_maps(y, x)[1] for y, x in cover], dtype=torch.float64)
        want_mean = m.mean()
        want_std = torch.sqrt((s**2 + m**2).mean() - want_mean**2)
        assert abs(float(mean[0, py, px]) - float(want_mean)) < 1e-6
        assert abs(float(std[0, py, px]) - float(want_std)) < 1e-6
        # the law of total variance: pooling windows whose means differ adds their spread
        assert float(std[0, py, px]) > float(torch.sqrt((s**2).mean())) or len(cover) == 1


def test_segment_with_a_one_pass_model_writes_masks_objects_and_uncertainty(student, tmp_path):
    save_weights(tmp_path / "fast", student, dtype=torch.float32)
    rng = np.random.default_rng(0)
    slide = write_ome_pyramid(tmp_path / "s.ome.tif", rng.integers(0, 255, (150, 150, 3), dtype=np.uint8), 0.5,
                              levels=1, tile=64)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["segment", str(slide), "--out", str(out), "--weights", str(tmp_path / "fast"),
                                    "--no-tissue-mask", "--save-uncertainty", "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "s.json").read_text())
    assert summary["steps"] == 1 and summary["votes"] == 1 and summary["model"]["tta"] is False
    for name in ("s.mask.ome.tif", "s.uncertainty.ome.tif", "s.nuclei.csv", "s.nuclei.geojson"):
        assert (out / name).is_file(), name
    res = CliRunner().invoke(main, ["segment", str(slide), "--out", str(tmp_path / "o2"), "--weights",
                                    str(tmp_path / "fast"), "--votes", "3"])
    assert res.exit_code != 0 and "one-pass model" in res.output
    assert load_model(tmp_path / "fast").config.one_pass


def test_one_pass_model_on_two_local_workers_matches_one_process(student, tmp_path, one_torch_thread):
    """The distributed paths build a one-pass model's sampler through the job like any other."""
    from cdal_fast.distributed.local import run_on_devices
    from cdal_fast.job import SegmentJob
    from cdal_fast.wsi.batch import TaskRun, segment_all
    from cdal_fast.wsi.options import SegmentOptions

    save_weights(tmp_path / "fast", student, dtype=torch.float32)
    bundle = load_weights(tmp_path / "fast")
    rng = np.random.default_rng(1)
    slide = write_ome_pyramid(tmp_path / "s.ome.tif", rng.integers(0, 255, (176, 176, 3), dtype=np.uint8), 0.5,
                              levels=1, tile=64)
    opts = SegmentOptions(batch_size=2, tile_overlap=16, workers=0, tissue=False, save_prob=True)
    job = SegmentJob.of(bundle, opts, weights=str(tmp_path / "fast"))
    assert (job.sampler.steps, job.sampler.votes, job.sampler.tta) == (1, 1, False)
    cpu = torch.device("cpu")
    single = TaskRun.local(job, job.build_sampler(bundle.generator, cpu), bundle.config, cpu)
    segment_all([slide], tmp_path / "one", single, echo=lambda m: None, show_progress=False)
    report, summary = run_on_devices([slide], tmp_path / "two", job, [cpu, cpu], echo=lambda m: None,
                                     show_progress=False)
    assert len(report.done) == 1 and summary["unit"] == "band"
    import tifffile

    a, b = (tifffile.imread(tmp_path / d / "s.prob.ome.tif") for d in ("one", "two"))
    assert np.array_equal(a, b)
