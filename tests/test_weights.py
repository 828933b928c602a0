import json

import pytest
import torch

from cdal_fast.config import get_preset
from cdal_fast.generator import Generator
from cdal_fast.weights import WeightsError, load_weights, save_weights


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
    meta["model"] = get_preset("tiny").to_dict()
    (tmp_path / "o.json").write_text(json.dumps({**json.loads((tmp_path / "o.json").read_text()), **meta}))
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
