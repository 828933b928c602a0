import json

import pytest
import torch

from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator
from cdal_fast.weights import WeightsError, load_weights, save_weights

from .conftest import perturbed


def test_round_trip(tmp_path, tiny_gen):
    st, js = save_weights(tmp_path / "m", tiny_gen, provenance={"steps": 10}, dtype=torch.float32)
    assert st.name == "m.safetensors" and js.name == "m.json"
    meta = json.loads(js.read_text())
    assert meta["preset"] == "tiny" and meta["provenance"] == {"steps": 10}
    assert meta["model"]["norm_mean"] == list(tiny_gen.cfg.norm_mean)
    bundle = load_weights(tmp_path / "m.safetensors")
    for (k, a), b in zip(tiny_gen.state_dict().items(), bundle.generator.state_dict().values()):
        assert torch.equal(a, b), k
    assert bundle.config == tiny_gen.cfg


def test_float16_storage(tmp_path, tiny_gen):
    save_weights(tmp_path / "h", tiny_gen)
    b = load_weights(tmp_path / "h")
    w0 = tiny_gen.conv_in.weight
    assert torch.allclose(b.generator.conv_in.weight, w0.half().float())
    assert (tmp_path / "h.safetensors").stat().st_size < 2 * sum(p.numel() for p in tiny_gen.parameters()) + 50_000


def test_config_mismatch(tmp_path, tiny_gen):
    save_weights(tmp_path / "m", tiny_gen)
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["model"]["nf"] = 32
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="does not match its config.*shape"):
        load_weights(tmp_path / "m")
    other = Generator(get_preset("tiny", num_res_blocks=2))
    save_weights(tmp_path / "o", other)
    o_meta = json.loads((tmp_path / "o.json").read_text())  # o's own hash, the tiny preset's config
    (tmp_path / "o.json").write_text(json.dumps({**o_meta, "model": get_preset("tiny").to_dict()}))
    with pytest.raises(WeightsError, match="unexpected tensors"):
        load_weights(tmp_path / "o")


def test_truncated_and_foreign_files(tmp_path, tiny_gen):
    st, _ = save_weights(tmp_path / "m", tiny_gen)
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        load_weights(tmp_path / "m")
    st.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_weights(tmp_path / "m")
    st.write_bytes(b"abc")
    with pytest.raises(WeightsError, match="too short"):
        load_weights(tmp_path / "m")


def test_missing_files_and_bad_config(tmp_path, tiny_gen):
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tmp_path / "nothing")
    save_weights(tmp_path / "m", tiny_gen)
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not a valid JSON"):
        load_weights(tmp_path / "m")
    (tmp_path / "m.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(WeightsError, match="not a cdal-fast weights config"):
        load_weights(tmp_path / "m")


def test_sharded_weights_round_trip_and_errors(tmp_path, tiny_gen):
    """A per-file cap spreads the tensors over NAME.partN files; every file stays under the cap."""
    cap = (64 << 10) + 400_000  # 400 kB of tensor data per file (the model is 1.56 MB in float32)
    st, js = save_weights(tmp_path / "s", tiny_gen, dtype=torch.float32, max_file_bytes=cap)
    meta = json.loads(js.read_text())
    files = [st] + [tmp_path / p["file"] for p in meta["parts"]]
    assert len(files) >= 3 and files[1].name == "s.part2.safetensors"
    assert all(f.stat().st_size <= cap for f in files)
    bundle = load_weights(tmp_path / "s")
    assert bundle.files == files
    for (k, a), b in zip(tiny_gen.state_dict().items(), bundle.generator.state_dict().values()):
        assert torch.equal(a, b), k
    # without a cap: one file and no parts key
    save_weights(tmp_path / "one", tiny_gen)
    assert "parts" not in json.loads((tmp_path / "one.json").read_text())
    # a missing or renamed shard is named in the error
    files[-1].unlink()
    with pytest.raises(WeightsError, match=f"shard not found: .*{files[-1].name}"):
        load_weights(tmp_path / "s")
    meta["parts"][0]["file"] = "../elsewhere.safetensors"
    js.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="shard 2 must be s.part2.safetensors"):
        load_weights(tmp_path / "s")
    # a single tensor over the cap can never be shipped within it
    with pytest.raises(WeightsError, match="does not fit"):
        save_weights(tmp_path / "x", tiny_gen, max_file_bytes=(64 << 10) + 100)


def _rewrite_tensors(st, js, change) -> None:
    """Replace the tensors of ``st`` by ``change(state)`` and record the new file's hash, so only the
    tensor values (not the integrity check) decide what the loader says."""
    from safetensors.torch import load_file, save_file

    from cdal_fast.weights import file_sha256

    state = change(load_file(str(st)))
    save_file(state, str(st))
    meta = json.loads(js.read_text())
    meta["sha256"] = file_sha256(st)
    js.write_text(json.dumps(meta))


def test_dotted_names_keep_their_companions(tmp_path, tiny_gen):
    """`model.v2` must never read or overwrite `model`'s files (Path.with_suffix would)."""
    from cdal_fast.weights import weights_paths

    assert weights_paths(tmp_path / "cdal-1.5") == (tmp_path / "cdal-1.5.safetensors", tmp_path / "cdal-1.5.json")
    assert weights_paths(tmp_path / "model.v2.json")[0] == tmp_path / "model.v2.safetensors"
    other = perturbed(Generator(get_preset("tiny")), seed=5)
    save_weights(tmp_path / "model", other, dtype=torch.float32)
    before = (tmp_path / "model.safetensors").read_bytes()
    st, js = save_weights(tmp_path / "model.v2.safetensors", tiny_gen, dtype=torch.float32)
    assert (st.name, js.name) == ("model.v2.safetensors", "model.v2.json")
    assert (tmp_path / "model.safetensors").read_bytes() == before  # the other model is untouched
    loaded = load_weights(tmp_path / "model.v2.safetensors").generator
    assert torch.equal(loaded.conv_in.weight, tiny_gen.conv_in.weight)
    cap = (64 << 10) + 400_000
    _, js = save_weights(tmp_path / "cdal-1.5", tiny_gen, dtype=torch.float32, max_file_bytes=cap)
    assert json.loads(js.read_text())["parts"][0]["file"] == "cdal-1.5.part2.safetensors"
    assert load_weights(tmp_path / "cdal-1.5").files[1] == tmp_path / "cdal-1.5.part2.safetensors"


def test_swapped_weights_fail_the_recorded_hash(tmp_path, tiny_gen):
    from cdal_fast.weights import file_sha256

    st, js = save_weights(tmp_path / "m", tiny_gen)
    bundle = load_weights(tmp_path / "m")
    assert bundle.verified and bundle.sha256 == file_sha256(st) == bundle.content_sha256
    save_weights(tmp_path / "o", perturbed(Generator(get_preset("tiny")), seed=9))
    st.write_bytes((tmp_path / "o.safetensors").read_bytes())  # same architecture, other values
    with pytest.raises(WeightsError, match=r"m\.safetensors: SHA-256 mismatch.*m\.json records"):
        load_weights(tmp_path / "m")
    # a config without recorded hashes still loads, but nothing may treat its hash as a fact
    meta = json.loads(js.read_text())
    del meta["sha256"]
    js.write_text(json.dumps(meta))
    legacy = load_weights(tmp_path / "m")
    assert not legacy.verified and legacy.sha256 == "" and legacy.content_sha256 == ""


def test_swapped_shard_fails_and_shards_enter_the_content_hash(tmp_path, tiny_gen):
    cap = (64 << 10) + 400_000
    st, js = save_weights(tmp_path / "s", tiny_gen, dtype=torch.float32, max_file_bytes=cap)
    bundle = load_weights(tmp_path / "s")
    assert len(bundle.file_sha256s) >= 3 and bundle.content_sha256 not in ("", bundle.sha256)
    shard = tmp_path / "s.part2.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last tensor value
    shard.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"s\.part2\.safetensors: SHA-256 mismatch"):
        load_weights(tmp_path / "s")


@pytest.mark.parametrize("bad", [torch.nan, torch.inf])
def test_non_finite_tensors_are_refused(tmp_path, tiny_gen, bad):
    st, js = save_weights(tmp_path / "m", tiny_gen, dtype=torch.float32)
    _rewrite_tensors(st, js, lambda s: {**s, "conv_in.weight": s["conv_in.weight"].index_fill(0, torch.tensor([0]),
                                                                                              bad)})
    with pytest.raises(WeightsError, match=r"tensor conv_in.weight holds \d+ NaN/Inf values"):
        load_weights(tmp_path / "m")


def test_integer_tensors_are_refused(tmp_path, tiny_gen):
    st, js = save_weights(tmp_path / "m", tiny_gen, dtype=torch.float32)
    _rewrite_tensors(st, js, lambda s: {**s, "conv_in.weight": s["conv_in.weight"].to(torch.int32)})
    with pytest.raises(WeightsError, match="tensor conv_in.weight has dtype int32; weights must be floating"):
        load_weights(tmp_path / "m")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("nf", 16384, r"nf: 16384 is out of range \(allowed: 2..1024\)"),
    ("nf", 16.0, r"nf: 16.0 is not an integer"),
    ("ch_mult", [], r"ch_mult: 0 entries \(allowed: 1..10\)"),
    ("attn_resolutions", 16, r"attn_resolutions: 16 is not a list of integers"),
    ("nz", -1, r"nz: -1 is out of range \(allowed: 1..4096\)"),
    ("votes", 1e9, r"votes: 1000000000.0 is not an integer"),
    ("votes", 10**9, r"votes: 1000000000 is out of range \(allowed: 1..1000\)"),
    ("num_steps", True, r"num_steps: True is not an integer"),
    ("ch_mult", [1, "2"], r"ch_mult\[1\]: '2' is not an integer"),
    ("norm_std", [65.78, 0.0, 57.78], r"norm_std\[1\]: 0.0 is out of range"),
    ("beta_max", float("nan"), r"beta_max: nan is not a finite number"),
    ("mpp", -0.5, r"mpp: -0.5 is out of range"),
    ("ch_mult", [64, 64, 64], r"model config is too large: about [\d,]+ generator parameters"),
])
def test_hostile_model_config_is_refused_before_any_allocation(tmp_path, tiny_gen, monkeypatch, field, value,
                                                               message):
    """Each example from issue 17 item 3: a clear WeightsError naming the field, and no model built."""
    import cdal_fast.weights as weights_mod

    _, js = save_weights(tmp_path / "m", tiny_gen)
    meta = json.loads(js.read_text())
    meta["model"][field] = value
    js.write_text(json.dumps(meta))

    def no_build(cfg):
        raise AssertionError("the generator was built from an unchecked config")

    monkeypatch.setattr(weights_mod, "Generator", no_build)
    with pytest.raises(WeightsError, match=r"m\.json: invalid model config: .*" + message):
        load_weights(tmp_path / "m")
