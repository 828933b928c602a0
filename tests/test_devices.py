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
