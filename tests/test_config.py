import json

import pytest

from cdal_fast.network.config import PRESETS, ConfigError, ModelConfig, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name):
    cfg = get_preset(name)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["name"] == name


def test_published_settings():
    m, c, h = get_preset("monuseg"), get_preset("cxr"), get_preset("hippocampus")
    assert (m.num_steps, m.votes, c.num_steps, c.votes, h.num_steps, h.votes) == (4, 5, 2, 30, 4, 5)
    assert m.ch_mult == (1, 1, 1, 2, 2, 4, 4) and m.attn_resolutions == (16, 8)
    assert h.mask_channels == 3 and h.multiclass and not m.multiclass
    assert m.norm_mean == (142.07, 98.48, 132.96) and m.mpp == 0.5


def test_errors():
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("nope")
    with pytest.raises(ConfigError, match="unknown model config keys: bogus"):
        ModelConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json("{")
    with pytest.raises(ConfigError, match="divisible"):
        get_preset("monuseg", image_size=100)
    with pytest.raises(ConfigError, match="norm_mean"):
        get_preset("cxr", img_channels=3)
