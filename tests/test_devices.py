"""Device lists for one-node multi-device runs, checked without a GPU (cuda_count is passed in)."""

from __future__ import annotations

import pytest
import torch

from cdal_fast.distributed.devices import DeviceListError, parse_devices

from .distributed_fixtures import same_bytes as _same_bytes


def test_all_uses_every_gpu_or_falls_back_to_the_cpu_with_a_warning():
    assert parse_devices("all", 3) == ([torch.device("cuda", i) for i in range(3)], None)
    devices, warning = parse_devices("all", 0)
    assert devices == [torch.device("cpu")] and "no CUDA device" in warning


def test_explicit_lists():
    assert parse_devices("cuda:1, cuda:0", 2)[0] == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert parse_devices("cuda", 1)[0] == [torch.device("cuda", 0)]  # bare cuda = cuda:0, not a duplicate
    assert parse_devices("cpu", 0) == ([torch.device("cpu")], None)


@pytest.mark.parametrize("text,count,match", [
    ("cuda:2", 2, "cuda:2 does not exist .*2 CUDA devices: cuda:0..cuda:1"),
    ("cuda:0", 0, "no CUDA device"),
    ("cuda:0,cuda", 2, "listed twice"),
    ("gpu0", 1, "not a device"),
    (" , ", 1, "no device named"),
])
def test_errors_name_the_device(text, count, match):
    with pytest.raises(DeviceListError, match=match):
        parse_devices(text, count)


def test_device_all_without_gpu_runs_on_the_cpu_with_identical_outputs(tmp_path, weights, slides, reference,
                                                                        monkeypatch, one_torch_thread):
    from click.testing import CliRunner

    from cdal_fast.cli import main

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["segment", str(slides / "s2.ome.tif"), "--out", str(out), "--weights",
                                    str(weights), "--device", "all", "--backend", "eager", "--batch-size", "2",
                                    "--seed", "3",
                                    "--tile-overlap", "16", "--workers", "0", "--no-tissue-mask", "--save-prob",
                                    "--save-uncertainty", "-q"])
    assert res.exit_code == 0, res.output
    assert "no CUDA device here, running on the CPU" in res.output
    _same_bytes(reference, out, ["s2"])


def test_cpu_may_repeat_but_a_gpu_may_not():
    assert parse_devices("cpu,cpu", 0) == ([torch.device("cpu"), torch.device("cpu")], None)
    with pytest.raises(DeviceListError, match="cuda:1 is listed twice"):
        parse_devices("cuda:1,cpu,cuda:1", 2)


def test_cpu_threads_are_split_between_cpu_workers():
    from cdal_fast.distributed.local import cpu_threads_per_worker

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert cpu_threads_per_worker([cpu, cpu], 5) == 2
    assert cpu_threads_per_worker([cpu, cpu, cpu], 2) == 1  # never zero
    assert cpu_threads_per_worker([cpu, gpu], 8) is None  # one CPU worker keeps the process's threads


def test_one_slide_spread_over_two_cpu_workers_is_byte_identical(tmp_path, weights, slides, reference, monkeypatch,
                                                                 one_torch_thread):
    import json

    from click.testing import CliRunner

    import cdal_fast.distributed.local as local
    from cdal_fast.cli import main

    bars = []

    class Recorded(local.ClusterProgress):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            bars.append(self)

    monkeypatch.setattr(local, "ClusterProgress", Recorded)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["segment", str(slides / "s1.ome.tif"), "--out", str(out), "--weights",
                                    str(weights), "--device", "cpu,cpu", "--backend", "eager", "--batch-size", "2",
                                    "--seed", "3",
                                    "--tile-overlap", "16", "--workers", "0", "--no-tissue-mask", "--save-prob",
                                    "--save-uncertainty", "-q"])
    assert res.exit_code == 0, res.output
    _same_bytes(reference, out, ["s1"])
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["unit"] == "band" and summary["devices"] == ["cpu", "cpu"]
    # 16 tiles, 4 per row, batch 2: 4 units of 4 tiles, and both workers sampled some
    assert len(summary["per_worker"]) == 2
    assert sum(w["tiles"] for w in summary["per_worker"].values()) == 16
    assert sum(w["units"] for w in summary["per_worker"].values()) == 4
    assert bars[0].counts() == (16, 16) and bars[0].done == 1
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_two_cpu_workers_take_whole_inputs_and_a_rerun_starts_none(tmp_path, weights, slides, reference,
                                                                    one_torch_thread):
    from cdal_fast.distributed.local import run_on_devices

    from .distributed_fixtures import job_for, small_opts

    files = [slides / "s0.ome.tif", slides / "s3.ome.tif"]
    spec = job_for(weights, small_opts())
    cpu = torch.device("cpu")
    report, summary = run_on_devices(files, tmp_path, spec, [cpu, cpu], echo=lambda m: None, show_progress=False)
    assert len(report.done) == 2 and summary["unit"] == "input"
    assert sum(w["inputs"] for w in summary["per_worker"].values()) == 2
    _same_bytes(reference, tmp_path, ["s0", "s3"])
    report, summary = run_on_devices(files, tmp_path, spec, [cpu, cpu], echo=lambda m: None, show_progress=False)
    assert len(report.skipped) == 2 and summary["unit"] is None and summary["per_worker"] == {}
