"""Type and range checks for a model config, run before anything is allocated from it.

A weights JSON is an untrusted file: ``nf = 16384`` would make the generator allocate gigabytes,
``nf = 16.0`` or ``attn_resolutions = 16`` would escape as a TypeError deep inside the model. Every
field is therefore checked here for its type (integers are ``int`` and never ``bool``, lists are
lists) and for a range generous enough for any published cDAL model (section 7 of the spec uses at
most nf 64, 7 levels, T 4, V 30). A genuinely larger model means raising the constants below; the
errors name the field, the value and the allowed range so that the limit is easy to find.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["ConfigError", "INT_LIMITS", "MAX_STEPS", "MAX_VOTES", "MAX_PARAMETER_ESTIMATE", "check_model_config",
           "parameter_estimate"]


class ConfigError(ValueError):
    """Raised for an invalid or unreadable configuration."""


MAX_STEPS = 1000  # reverse steps T; the published models use 2-4
MAX_VOTES = 1000  # votes V; the published models use 5-30
# Inclusive (low, high) for every integer field.
INT_LIMITS: dict[str, tuple[int, int]] = {
    "img_channels": (1, 16),
    "mask_channels": (1, 64),
    "image_size": (8, 4096),
    "nf": (2, 1024),
    "num_res_blocks": (1, 16),
    "cond_enc_layers": (1, 16),
    "cond_enc_num_res_blocks": (1, 16),
    "nz": (1, 4096),
    "zdim": (1, 4096),
    "n_mlp": (1, 16),
    "ngf": (1, 1024),
    "t_emb_dim": (1, 4096),
    "attn_scale": (1, 16),
    "num_steps": (1, MAX_STEPS),
    "votes": (1, MAX_VOTES),
}
CH_MULT_LIMITS = (1, 64)  # each channel multiplier
MAX_LEVELS = 10  # entries of ch_mult (resolution levels of the U-Net)
MAX_ATTN_RESOLUTIONS = 16
# A rough estimate of generator parameters (see parameter_estimate); 250 M estimated is about
# 400 M real parameters (1.6 GB in float32), 9x the largest published preset (monuseg, 41.7 M).
MAX_PARAMETER_ESTIMATE = 250_000_000
MAX_NAME_LENGTH = 128
MAX_MPP = 100.0  # micrometres per pixel; whole-slide images are 0.1-10
MAX_BETA = 1000.0


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"model config field {name}: {value!r} is not an integer (allowed: integers "
                          f"{low}..{high})")
    if not low <= value <= high:
        raise ConfigError(f"model config field {name}: {value} is out of range (allowed: {low}..{high})")
    return value


def _float(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"model config field {name}: {value!r} is not a finite number")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ConfigError(f"model config field {name}: {value} is out of range (allowed: {bracket}{low}, {high}])")
    return float(value)


def _int_list(name: str, value: Any, low: int, high: int, min_len: int, max_len: int) -> None:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"model config field {name}: {value!r} is not a list of integers")
    if not min_len <= len(value) <= max_len:
        raise ConfigError(f"model config field {name}: {len(value)} entries (allowed: {min_len}..{max_len})")
    for i, item in enumerate(value):
        _int(f"{name}[{i}]", item, low, high)


def _float_list(name: str, value: Any, length: int, positive: bool) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ConfigError(f"model config field {name}: {value!r} must be a list of {length} numbers "
                          "(one per image channel)")
    for i, item in enumerate(value):
        _float(f"{name}[{i}]", item, 0.0 if positive else -1e6, 1e6, low_open=positive)


def parameter_estimate(cfg: Any) -> int:
    """Rough parameter count of the generator from its widths, computed without building it.

    Per level: (num_res_blocks + 1) residual blocks of two 3x3 convolutions in the encoder, the
    decoder and the condition encoder. It is 0.55-0.7x the true count of the published presets
    (monuseg 28.7 M estimated vs 41.7 M), which is all a guard against absurd configs needs.
    """
    widths = [cfg.nf * m for m in cfg.ch_mult]
    per_block = sum(2 * 9 * w * w for w in widths)
    return 3 * (cfg.num_res_blocks + 1) * per_block + cfg.zdim * cfg.zdim * cfg.n_mlp


def check_model_config(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming the first field whose type or range is wrong."""
    if not isinstance(cfg.name, str) or not 0 < len(cfg.name) <= MAX_NAME_LENGTH:
        raise ConfigError(f"model config field name: {cfg.name!r} must be a string of 1..{MAX_NAME_LENGTH} "
                          "characters")
    if cfg.disc not in ("large", "small"):
        raise ConfigError(f"model config field disc: {cfg.disc!r} (allowed: 'large' or 'small')")
    for name, (low, high) in INT_LIMITS.items():
        _int(name, getattr(cfg, name), low, high)
    _int_list("ch_mult", cfg.ch_mult, *CH_MULT_LIMITS, 1, MAX_LEVELS)
    _int_list("attn_resolutions", cfg.attn_resolutions, 1, INT_LIMITS["image_size"][1], 0, MAX_ATTN_RESOLUTIONS)
    _float_list("norm_mean", cfg.norm_mean, cfg.img_channels, positive=False)
    _float_list("norm_std", cfg.norm_std, cfg.img_channels, positive=True)
    if cfg.mpp is not None:
        _float("mpp", cfg.mpp, 0.0, MAX_MPP, low_open=True)
    _float("dropout", cfg.dropout, 0.0, 0.99)
    for name in ("tta", "one_pass", "cpu_int8"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"model config field {name}: {getattr(cfg, name)!r} is not a boolean "
                              "(allowed: true or false)")
    _float("threshold", cfg.threshold, 0.0, 1.0, low_open=True)
    if cfg.threshold == 1.0:
        raise ConfigError("model config field threshold: 1.0 is out of range (allowed: (0.0, 1.0), a vote mean "
                          "never exceeds 1)")
    _float("beta_min", cfg.beta_min, 0.0, MAX_BETA, low_open=True)
    _float("beta_max", cfg.beta_max, 0.0, MAX_BETA, low_open=True)
    if cfg.beta_max < cfg.beta_min:
        raise ConfigError(f"model config fields beta_min {cfg.beta_min} > beta_max {cfg.beta_max}")
    down = 2 ** (len(cfg.ch_mult) - 1)
    if cfg.image_size % down:
        raise ConfigError(f"model config field image_size: {cfg.image_size} must be divisible by {down} "
                          f"(2 ** (len(ch_mult) - 1))")
    if cfg.nf % 2:
        raise ConfigError(f"model config field nf: {cfg.nf} must be even (sinusoidal step embedding)")
    estimate = parameter_estimate(cfg)
    if estimate > MAX_PARAMETER_ESTIMATE:
        raise ConfigError(f"model config is too large: about {estimate:,} generator parameters estimated from "
                          f"nf {cfg.nf}, ch_mult {list(cfg.ch_mult)}, num_res_blocks {cfg.num_res_blocks} "
                          f"(limit {MAX_PARAMETER_ESTIMATE:,}: config_limits.MAX_PARAMETER_ESTIMATE)")
