"""`segment --ray`: outputs byte-identical to one process, failures reported, dead actors replaced.

One local Ray instance (2 CPUs, no dashboard, 127.0.0.1) serves the whole module and is stopped at
the end; slides are tiny (a few tiles of the `tiny` model) so that the module stays well under two
minutes on a 2-core CI runner.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from cdal_fast.distributed.ray_runner import ACTOR_ENV, RayOptions, actor_runtime_env, run_on_ray, unit_slices
from cdal_fast.job import SegmentJob
from cdal_fast.wsi.options import SegmentOptions

from .distributed_fixtures import job_for, same_bytes, small_opts

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), **ACTOR_ENV}})
    yield ray
    ray.shutdown()


def _opts(**kw) -> SegmentOptions:
    return small_opts(**kw)


def _spec(weights: Path, opts: SegmentOptions) -> SegmentJob:
    return job_for(weights, opts)


def _same_bytes(a: Path, b: Path, stems: list[str]) -> None:
    same_bytes(a, b, stems)


def _no_partials(out: Path) -> None:
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_unit_slices_are_whole_batches():
    # 10 tiles, 4 per row, batch 3: units of ceil(4/3)=2 batches = 6 tiles; the loader cuts at 0,3,6,9
    assert unit_slices(10, 4, 3, 1) == [range(0, 6), range(6, 10)]
    assert unit_slices(5, 4, 8, 2) == [range(0, 5)]


def test_many_slides_and_a_corrupt_file(local_ray, tmp_path, weights, slides, reference):
    bad = tmp_path / "in" / "broken.ome.tif"
    bad.parent.mkdir()
    bad.write_bytes(b"not a tiff at all")
    files = sorted(slides.glob("s*.ome.tif")) + [bad]
    out = tmp_path / "out"
    report, summary = run_on_ray(files, out, _spec(weights, _opts()), RayOptions(actors=2, unit="input"),
                                 echo=lambda m: None, show_progress=False)
    assert [f.file for f in report.failed] == [str(bad)]
    assert len(report.done) == 4
    _same_bytes(reference, out, [f"s{i}" for i in range(4)])
    assert summary["ray"]["actors"] == 2 and sum(a["units"] for a in summary["ray"]["per_actor"]) == 5
    _no_partials(out)
    # a rerun does only what is missing: here nothing, so no actor is even started
    report2, summary2 = run_on_ray(files[:4], out, _spec(weights, _opts()), RayOptions(actors=2),
                                   echo=lambda m: None, show_progress=False)
    assert len(report2.skipped) == 4 and not report2.done and summary2["ray"]["actors"] == 0


def test_actors_run_at_nice_0_unless_the_job_already_does():
    class Context:
        def __init__(self, env):
            self.runtime_env = {"env_vars": env}

    class FakeRay:
        def __init__(self, env):
            self.env = env

        def get_runtime_context(self):
            return Context(self.env)

    assert actor_runtime_env(FakeRay({"PYTHONPATH": "x", **ACTOR_ENV})) == {}  # pre-started workers fit
    assert actor_runtime_env(FakeRay({"PYTHONPATH": "x"})) == {"runtime_env": {"env_vars": ACTOR_ENV}}


def test_one_slide_split_over_two_actors(local_ray, tmp_path, weights, slides, reference):
    out = tmp_path / "out"
    actors: list[dict] = []

    def events(kind: str, data: dict) -> None:
        if kind == "actors":
            actors.extend(data["identities"])

    report, summary = run_on_ray([slides / "s1.ome.tif"], out, _spec(weights, _opts()),
                                 RayOptions(actors=2, unit="band", events=events), echo=lambda m: None,
                                 show_progress=False)
    assert len(report.done) == 1, report.failed
    # not Ray's default nice 15 for workers, and torch on exactly the actor's num_cpus (1)
    assert [(a["nice"], a["threads"]) for a in actors] == [(0, 1), (0, 1)]
    assert summary["ray"]["unit"] == "band"
    assert len(summary["ray"]["per_actor"]) == 2  # both actors sampled part of the slide
    _same_bytes(reference, out, ["s1"])
    _no_partials(out)


def test_killed_actor_is_replaced_and_outputs_are_identical(local_ray, tmp_path, weights, slides, reference):
    killed: list[int] = []
    pids: list[int] = []

    def events(kind: str, data: dict) -> None:
        if kind == "actors":
            pids.extend(i["pid"] for i in data["identities"])
        elif kind == "unit" and not killed:
            victim = pids[-1]  # whichever it is, it is alive and holds or will get a unit
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    out = tmp_path / "out"
    report, summary = run_on_ray(sorted(slides.glob("s*.ome.tif")), out, _spec(weights, _opts()),
                                 RayOptions(actors=2, unit="band", events=events), echo=lambda m: None,
                                 show_progress=False)
    assert killed and summary["ray"]["actor_deaths"] >= 1
    assert len(report.done) == 4, report.failed
    _same_bytes(reference, out, [f"s{i}" for i in range(4)])
    _no_partials(out)


def test_without_ray_the_cli_fails_at_start_with_the_hint(tmp_path, weights, slides, monkeypatch):
    import sys

    from click.testing import CliRunner

    from cdal_fast.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    res = CliRunner().invoke(main, ["segment", str(slides), "--out", str(tmp_path / "o"), "--weights", str(weights),
                                    "--ray", "local", "-q"])
    assert res.exit_code != 0 and "pip install 'cdal-fast[ray]'" in res.output
    assert not (tmp_path / "o").exists()  # nothing started
