"""`--shard I/N`: a stable, disjoint, complete split of the inputs, whatever order they are found in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdal_fast.wsi.shard import ShardError, parse_shard, select_shard, shard_key

from .distributed_fixtures import same_bytes as _same_bytes

REPO = Path(__file__).resolve().parents[1]


def _folder(root: Path, names: list[str]) -> list[Path]:
    files = []
    for n in names:
        f = root / n
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
        files.append(f)
    return files


@pytest.mark.parametrize("text,expected", [("0/1", (0, 1)), ("3/4", (3, 4)), (" 1/2", (1, 2))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["4/4", "1/0", "-1/3", "1", "a/b", "1/2/3", "1.5/3"])
def test_parse_shard_rejects(text):
    with pytest.raises(ShardError, match="--shard"):
        parse_shard(text)


def test_shards_are_disjoint_complete_and_independent_of_order_and_mount_point(tmp_path):
    names = [f"s{i:02d}.tif" for i in range(40)] + ["sub/a.tif", "sub/b.tif"]
    a = _folder(tmp_path / "mount_a" / "slides", names)
    b = _folder(tmp_path / "mount_b" / "data", names)  # the same folder seen from another node
    n = 3
    parts_a = [select_shard(a, [tmp_path / "mount_a" / "slides"], i, n) for i in range(n)]
    parts_b = [select_shard(list(reversed(b)), [tmp_path / "mount_b" / "data"], i, n) for i in range(n)]
    keys_a = [{shard_key(f, [tmp_path / "mount_a" / "slides"]) for f in part} for part in parts_a]
    keys_b = [{shard_key(f, [tmp_path / "mount_b" / "data"]) for f in part} for part in parts_b]
    assert keys_a == keys_b  # every node agrees, whatever its mount point and discovery order
    assert sum(len(k) for k in keys_a) == len(names) == len(set().union(*keys_a))
    assert all(len(k) > 5 for k in keys_a)  # 42 inputs over 3 shards: none nearly empty
    # adding a file does not move the others (a position-based split would)
    more = a + _folder(tmp_path / "mount_a" / "slides", ["new.tif"])
    for i in range(n):
        assert set(parts_a[i]) <= set(select_shard(more, [tmp_path / "mount_a" / "slides"], i, n))


def test_key_of_a_file_argument_is_its_name(tmp_path):
    f = _folder(tmp_path / "x", ["deep/slide.svs"])[0]
    assert shard_key(f, [f]) == "slide.svs"
    assert shard_key(f, [tmp_path / "x"]) == "deep/slide.svs"


def test_two_concurrent_shard_jobs_do_each_slide_once(tmp_path, weights, slides, reference):
    out = tmp_path / "out"
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # the reference's thread count
    args = [sys.executable, "-m", "cdal_fast.cli", "segment", str(slides), "--out", str(out), "--weights",
            str(weights), "--backend", "eager", "--batch-size", "2", "--seed", "3", "--tile-overlap", "16",
            "--workers", "0",
            "--no-tissue-mask", "--save-prob", "--save-uncertainty", "-q"]
    jobs = [subprocess.Popen([*args, "--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(2)]
    logs = [j.communicate(timeout=300)[0] for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], logs
    done = [json.loads((out / f"run_summary.shard-{i}-of-2.json").read_text())["processed"] for i in range(2)]
    assert sum(done) == 4 and min(done) >= 1, done  # each slide once, both jobs had work
    _same_bytes(reference, out, [f"s{i}" for i in range(4)])
