"""Training loop: overfitting, loss decrease, bit-exact resume, data-parallel under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdal_fast.metrics import dice_iou
from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator
from cdal_fast.sampling.preprocess import normalise
from cdal_fast.sampling.sampler import FixedStepSampler, sample
from cdal_fast.training.data import MonusegData, TaskData
from cdal_fast.training.loop import TrainConfig, Trainer, ema_decay

from .conftest import perturbed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def monuseg_tiny(shared_data):
    cfg = get_preset("tiny")
    return MonusegData.load(shared_data / "monuseg", cfg, "train", tile_size=256)


def _tc(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(preset="tiny", batch_size=4, max_steps=6, val_every=0, ckpt_every=0, progress=False,
                out=str(tmp_path / "run"), device="cpu", lazy_reg=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_overfits_one_crop(tmp_path, monuseg_tiny):
    """A tiny model learns one real 64x64 MoNuSeg crop (Dice > 0.9) within 150 iterations."""
    cfg = monuseg_tiny.cfg
    img = monuseg_tiny.images[:1, :, 64:128, 64:128].clone()
    msk = monuseg_tiny.masks[:1, :, 64:128, 64:128].clone()
    data = TaskData(cfg, img, msk, ["crop"], "none")
    tr = Trainer(_tc(tmp_path, lr_g=1e-3, cosine=False, max_steps=150, lazy_reg=10), data=data)
    first = tr.train_step()["loss_g"]
    for _ in range(149):
        last = tr.train_step()["loss_g"]
    assert last < first * 0.2
    prob, _ = sample(FixedStepSampler(tr.G.eval()), normalise(img, cfg), seed=0)
    dice, _ = dice_iou(prob[0, 0] >= 0.5, msk[0, 0] > 0)
    assert dice > 0.9


def test_real_loop_decreases_loss_and_writes_checkpoint(tmp_path, monuseg_tiny):
    tr = Trainer(_tc(tmp_path, max_steps=30, log_every=1, ckpt_every=30, lr_g=5e-4), data=monuseg_tiny)
    summary = tr.fit()
    assert summary["step"] == 30
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss_g"] for r in log if "loss_g" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["step"] == 30 and "opt_g" in ckpt and "gen" in ckpt


def test_resume_is_bit_exact(tmp_path, monuseg_tiny):
    """3 steps + checkpoint + fresh process state + 3 steps == 6 uninterrupted steps."""
    ref = Trainer(_tc(tmp_path / "a", ema=0.9), data=monuseg_tiny)
    ref_losses = [ref.train_step() for _ in range(6)]

    first = Trainer(_tc(tmp_path / "b", ema=0.9), data=monuseg_tiny)
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()
    del first
    torch.manual_seed(12345)  # disturb the global RNG: resume must not depend on it
    second = Trainer(_tc(tmp_path / "b", ema=0.9), data=monuseg_tiny)
    assert second.resume()
    assert second.step == 3
    resumed = [second.train_step() for _ in range(3)]
    assert resumed == ref_losses[3:]
    for a, b in zip(ref.G.state_dict().values(), second.G.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ref.ema.state_dict().values(), second.ema.state_dict().values()):
        assert torch.equal(a, b)  # the step-dependent EMA decay resumes too


def test_ema_decay_ramps_to_its_target():
    assert ema_decay(0.999, 0, 10) == pytest.approx(0.1)
    assert ema_decay(0.999, 90, 10) == pytest.approx(0.91)
    assert ema_decay(0.999, 10**6, 10) == 0.999
    assert ema_decay(0.999, 0, None) == 0.999


def test_first_ema_update_uses_the_warmup_decay(tmp_path, monuseg_tiny):
    tr = Trainer(_tc(tmp_path / "r", ema=0.999), data=monuseg_tiny)
    before = [p.detach().clone() for p in tr.ema.parameters()]
    tr.train_step()
    moved = False
    for b, pe, p in zip(before, tr.ema.parameters(), tr.G.parameters()):
        torch.testing.assert_close(pe, b.lerp(p, 0.9), rtol=1e-6, atol=1e-7)  # decay 1/10 at step 0
        moved |= not torch.equal(pe, b)
    assert moved


def test_checkpoint_write_is_atomic(tmp_path, monuseg_tiny):
    tr = Trainer(_tc(tmp_path), data=monuseg_tiny)
    tr.train_step()
    path = tr.save_checkpoint()
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, shared_data):
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps({
        "task": "monuseg", "preset": "tiny", "data": str(shared_data / "monuseg"), "out": str(tmp_path / "ddp"),
        "batch_size": 2, "max_steps": 4, "val_every": 0, "ckpt_every": 0, "device": "cpu", "progress": False,
        "lazy_reg": 2,
    }))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # --standalone: the launcher binds port 0 and keeps it, so no other run (a parallel CI job, a
    # second checkout) can take or share the rendezvous port, as a fixed --master_port allowed.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cdal_fast.cli", "train", "--config", str(cfg_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["step"] == 4
    assert summary["ranks_in_sync"] is True
    assert (tmp_path / "ddp" / "last.pt").is_file()


def test_fine_tune_starts_from_saved_weights_and_scores_them_first(tmp_path, monuseg_tiny, shared_data):
    """init_weights loads G and its EMA; the run validates step 0 so it never ships worse weights."""
    from cdal_fast.weights import load_weights, save_weights

    torch.manual_seed(3)
    src = perturbed(Generator(get_preset("tiny")))
    save_weights(tmp_path / "start", src)
    start = load_weights(tmp_path / "start")  # float16 on disk: compare with what was stored

    tc = _tc(tmp_path, ema=0.99, max_steps=1, val_every=5, val_limit=1, val_votes=1,
             data=str(shared_data / "monuseg"), init_weights=str(tmp_path / "start"))
    tr = Trainer(tc, data=monuseg_tiny)
    assert tr.start() == f"generator initialised from {tc.init_weights}"  # no last.pt to resume
    for module in (tr.G, tr.ema):
        for name, ref in start.generator.state_dict().items():
            assert torch.equal(module.state_dict()[name], ref), name
    tr.fit()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and "val_dice" in log[0]  # the starting point is scored first
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["provenance"]["init_sha256"] == start.sha256
    again = Trainer(tc, data=monuseg_tiny)
    assert again.start().startswith("resumed from") and again.step == 1  # a rerun resumes, not re-inits
    assert again.init_sha256 == start.sha256  # and its exports still name the weights it started from


def test_fine_tune_refuses_weights_of_another_layout(tmp_path, monuseg_tiny):
    from cdal_fast.weights import save_weights

    save_weights(tmp_path / "other", Generator(get_preset("tiny", nf=32)))
    tr = Trainer(_tc(tmp_path), data=monuseg_tiny)
    with pytest.raises(ValueError, match="differs from preset 'tiny' in nf"):
        tr.init_from(tmp_path / "other")


def test_cpu_amp_trains_in_bf16_but_validates_and_exports_float32(tmp_path, monuseg_tiny, shared_data):
    """cpu_amp: bf16 autocast + channels_last for the training steps only; validation scores the
    weights in float32 (as the shipped model is run) and the export is plain contiguous safetensors."""
    from cdal_fast.weights import load_weights

    kw = dict(max_steps=2, val_limit=1, val_votes=1, data=str(shared_data / "monuseg"))
    fast = Trainer(_tc(tmp_path / "amp", cpu_amp=True, **kw), data=monuseg_tiny)
    ref = Trainer(_tc(tmp_path / "ref", **kw), data=monuseg_tiny)
    assert fast.amp and fast.channels_last and not fast.val_amp and not ref.amp
    conv = next(p for p in fast.G.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        a, b = fast.train_step(), ref.train_step()
        assert all(torch.isfinite(torch.tensor(v)) for v in a.values())
        assert a["loss_g"] == pytest.approx(b["loss_g"], rel=0.05)  # same seed, same draws
    ref.G.load_state_dict(fast.G.state_dict())
    assert fast.validate().dice == pytest.approx(ref.validate().dice, abs=1e-3)
    fast.export("best")
    saved = load_weights(tmp_path / "amp" / "run" / "best").generator.state_dict()
    for name, t in fast.G.state_dict().items():
        assert torch.equal(saved[name], t.half().float()), name  # float16 on disk


@pytest.mark.parametrize(("finished", "calls"), [(True, ["barrier", "destroy"]), (False, ["destroy"])])
def test_process_group_teardown_order(monkeypatch, finished, calls):
    """A finished rank waits for its peers before destroying the group (no rank tears gloo down
    under another's feet); a failed rank destroys at once (its peers may never arrive)."""
    import torch.distributed as dist

    from cdal_fast.cli import _leave_process_group

    seen: list[str] = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: seen.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: seen.append("destroy"))
    _leave_process_group(finished)
    assert seen == calls


def test_fine_tune_provenance_records_only_a_verified_hash(tmp_path):
    """init_sha256 is a fact: swapped weights beside their old JSON are refused, not recorded under
    the JSON's claim; weights whose JSON records no hash start the run but name no hash."""
    from types import SimpleNamespace

    from cdal_fast.weights import WeightsError, file_sha256, save_weights

    st, js = save_weights(tmp_path / "start", perturbed(Generator(get_preset("tiny"))))
    save_weights(tmp_path / "other", perturbed(Generator(get_preset("tiny")), seed=4))
    target = SimpleNamespace(device=torch.device("cpu"), cfg=get_preset("tiny"), G=Generator(get_preset("tiny")),
                             ema=None, tc=SimpleNamespace(preset="tiny"), init_sha256="")
    Trainer.init_from(target, tmp_path / "start")
    assert target.init_sha256 == file_sha256(st)
    claimed = target.init_sha256
    st.write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        Trainer.init_from(target, tmp_path / "start")
    meta = json.loads(js.read_text())
    del meta["sha256"]
    js.write_text(json.dumps(meta))
    Trainer.init_from(target, tmp_path / "start")
    assert target.init_sha256 == "" != claimed


def test_generator_only_fine_tune_has_no_discriminator(tmp_path, monuseg_tiny):
    from cdal_fast.weights import save_weights

    torch.manual_seed(5)
    save_weights(tmp_path / "start", perturbed(Generator(get_preset("tiny"))))
    tr = Trainer(_tc(tmp_path, attention="none", init_weights=str(tmp_path / "start")), data=monuseg_tiny)
    tr.start()
    assert tr.D is None and tr.opt_d is None and tr.sched_d is None  # nothing of D is built
    g_before = {k: v.clone() for k, v in tr.G.state_dict().items()}
    losses = tr.train_step()
    assert set(losses) == {"loss_g"}  # no D loss was computed
    assert any(not torch.equal(v, g_before[k]) for k, v in tr.G.state_dict().items())
    st = torch.load(tr.save_checkpoint(), weights_only=True)
    assert st["D"] is None and st["opt_d"] is None and st["sched_d"] is None
    # its checkpoint resumes a generator-only run, and is refused by one that would train D on top of it
    again = Trainer(_tc(tmp_path, attention="none", init_weights=str(tmp_path / "start")), data=monuseg_tiny)
    assert again.start().startswith("resumed from") and again.step == 1
    assert all(torch.equal(v, tr.G.state_dict()[k]) for k, v in again.G.state_dict().items())
    with_d = Trainer(_tc(tmp_path, init_weights=str(tmp_path / "start")), data=monuseg_tiny)
    with pytest.raises(ValueError, match="trained with attention 'none', this run asks for 'discriminator'"):
        with_d.start()
    with pytest.raises(ValueError, match="holds no discriminator"):
        with_d.load_state_dict(st)


def test_generator_only_resumes_a_checkpoint_that_still_carries_a_discriminator(tmp_path, monuseg_tiny):
    """Generator-only checkpoints written before D was dropped from that mode hold an untrained D:
    they resume, the D entries ignored."""
    from cdal_fast.weights import save_weights

    save_weights(tmp_path / "start", perturbed(Generator(get_preset("tiny"))))
    with_d = Trainer(_tc(tmp_path / "a", init_weights=str(tmp_path / "start")), data=monuseg_tiny)
    with_d.start()
    st = with_d.state_dict()
    st["train"] = json.dumps({**json.loads(st["train"]), "attention": "none"})
    st["step"] = 7
    (tmp_path / "b" / "run").mkdir(parents=True)
    torch.save(st, tmp_path / "b" / "run" / "last.pt")
    gonly = Trainer(_tc(tmp_path / "b", attention="none", init_weights=str(tmp_path / "start")), data=monuseg_tiny)
    assert gonly.start().startswith("resumed from") and gonly.step == 7 and gonly.D is None


@pytest.mark.parametrize("bad, match", [
    (dict(attention="pixels"), "attention must be one of discriminator, none, not 'pixels'"),
    (dict(attention="none"), "give init_weights"),
])
def test_training_config_refuses_bad_attention(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        _tc(tmp_path, **bad)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"preset": "tiny", **bad}))
    from cdal_fast.training.loop import load_train_config

    with pytest.raises(ValueError, match=f"bad.json: .*{match}"):
        load_train_config(path)


def test_validation_samples_with_the_models_test_time_augmentation_and_threshold(tmp_path, monuseg_tiny):
    """A run whose model config carries the shipped defaults validates with them."""
    shipped = Trainer(_tc(tmp_path / "a", model_overrides={"tta": True, "threshold": 0.4}), data=monuseg_tiny)
    plain = Trainer(_tc(tmp_path / "b"), data=monuseg_tiny)
    assert shipped.val_sampler().tta and not plain.val_sampler().tta
    assert shipped.cfg.threshold == 0.4 and plain.cfg.threshold == 0.5  # evaluate_task decodes with cfg
