"""Typed model configuration and the published presets.

A :class:`ModelConfig` fully determines the generator and discriminator architecture, the
diffusion schedule used at sampling time and the input normalisation, so that a weights file plus
its JSON config is everything a user needs to run the model. The published presets reproduce
section 7 of the cDAL spec exactly (the parameter-count tests rely on it); ``tiny`` exists only so
that CPU tests finish in seconds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config_limits import ConfigError, check_model_config

__all__ = ["ModelConfig", "PRESETS", "INFERENCE_FIELDS", "get_preset", "load_config", "ConfigError"]


VOLUME_SCALINGS = ("zscore", "minmax")
# Fields that change how a model is run, not what it is: exported graphs and caches compare
# configs without them (a graph exported before a default changed is still the same network).
INFERENCE_FIELDS = ("tta", "threshold", "cpu_int8")
AXIS_CODES = "LRAPIS"  # nibabel's axis codes: the direction each array axis points to


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, schedule and data conventions of one cDAL model."""

    name: str = "custom"
    # Data
    img_channels: int = 3
    mask_channels: int = 1
    image_size: int = 256
    norm_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    norm_std: tuple[float, ...] = (255.0, 255.0, 255.0)
    mpp: float | None = None  # micrometres per pixel the model was trained at
    # Generator (NCSN++ style U-Net)
    nf: int = 64
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    cond_enc_layers: int = 3
    cond_enc_num_res_blocks: int = 2
    nz: int = 100
    zdim: int = 256
    n_mlp: int = 3
    dropout: float = 0.0
    # Discriminator
    disc: str = "large"  # "large" (6 downsampling blocks) or "small" (3)
    ngf: int = 64
    t_emb_dim: int = 256
    attn_scale: int = 3
    # Diffusion schedule
    num_steps: int = 4
    votes: int = 5
    beta_min: float = 0.1
    beta_max: float = 20.0
    # A one-pass model distilled from a diffusion ensemble (cdal_fast.sampling.one_pass): the same
    # network run once, with no noise, whose head gives two maps per mask channel: the ensemble's
    # vote-mean probability and its vote spread (uncertainty).
    one_pass: bool = False
    # Preprocessing and decoding conventions. The defaults are cdal-fast's own; models imported
    # from the authors' checkpoints (cdal_fast.authors) carry the authors' (see docs/authors.md).
    volume_scaling: str = "zscore"  # 3D volumes: "zscore" (non-zero voxels) or "minmax" (to [-1, 1])
    mask_polarity: int = 1  # +1: the object is the network's +1 side; -1: the -1 side (authors' cxr)
    volume_orientation: str = "native"  # 3D volumes: "native" (as stored) or nibabel axis codes, e.g. "LPI"
    # Inference defaults chosen on validation (never part of the architecture; see INFERENCE_FIELDS):
    # test-time augmentation of the votes (cdal_fast.sampling.dihedral); `--tta/--no-tta` overrides it.
    tta: bool = False
    # binary models: a pixel is object where the vote-mean P(object) >= threshold (cdal_fast.sampling.decode);
    # `--threshold` overrides it. Multi-class models take the argmax and ignore it.
    threshold: float = 0.5
    # CPUs with VNNI: `--backend auto` may run the static int8 sampler graph (cdal_fast.runtime.onnx_quant),
    # because for this model it met the mask agreement rule (Dice >= 0.99 against float32 on real tiles).
    cpu_int8: bool = False

    def __post_init__(self) -> None:
        # Types and ranges first (config_limits): a config from a file is untrusted, and nothing
        # may be allocated from it before every field is known to be sane.
        check_model_config(self)
        # The preprocessing/decoding conventions (cdal_fast.authors imports carry the authors' ones).
        if self.volume_scaling not in VOLUME_SCALINGS:
            raise ConfigError(f"model config field volume_scaling: {self.volume_scaling!r} "
                              f"(allowed: {', '.join(VOLUME_SCALINGS)})")
        if self.volume_orientation != "native" and (
                not isinstance(self.volume_orientation, str) or len(self.volume_orientation) != 3
                or not set(self.volume_orientation) <= set(AXIS_CODES)):
            raise ConfigError(f"model config field volume_orientation: {self.volume_orientation!r} (allowed: "
                              f"'native' or three axis codes from {AXIS_CODES}, e.g. 'LPI')")
        if isinstance(self.mask_polarity, bool) or self.mask_polarity not in (1, -1):
            raise ConfigError(f"model config field mask_polarity: {self.mask_polarity!r} (allowed: 1 or -1)")

    @property
    def multiclass(self) -> bool:
        """True when masks are one-hot over several classes (argmax decoding)."""
        return self.mask_channels > 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def architecture_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without :data:`INFERENCE_FIELDS`: what must match for weights or a graph to fit."""
        return {k: v for k, v in self.to_dict().items() if k not in INFERENCE_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")

        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("model config JSON must be an object")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


MONUSEG_MEAN = (142.07, 98.48, 132.96)
MONUSEG_STD = (65.78, 57.05, 57.78)

PRESETS: dict[str, ModelConfig] = {
    "monuseg": ModelConfig(
        name="monuseg", img_channels=3, mask_channels=1, image_size=256,
        norm_mean=MONUSEG_MEAN, norm_std=MONUSEG_STD, mpp=0.5,
        nf=64, ch_mult=(1, 1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16, 8),
        cond_enc_layers=5, cond_enc_num_res_blocks=1, nz=100, zdim=256, n_mlp=3,
        disc="large", ngf=64, t_emb_dim=256, attn_scale=3, num_steps=4, votes=5,
    ),
    "cxr": ModelConfig(
        name="cxr", img_channels=1, mask_channels=1, image_size=256,
        norm_mean=(127.5,), norm_std=(127.5,),
        nf=32, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1, attn_resolutions=(16,),
        cond_enc_layers=3, cond_enc_num_res_blocks=2, nz=100, zdim=256, n_mlp=3,
        disc="large", ngf=64, t_emb_dim=256, attn_scale=2, num_steps=2, votes=30,
    ),
    "hippocampus": ModelConfig(
        name="hippocampus", img_channels=1, mask_channels=3, image_size=32,
        norm_mean=(0.0,), norm_std=(1.0,),
        nf=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
        cond_enc_layers=3, cond_enc_num_res_blocks=2, nz=50, zdim=128, n_mlp=3,
        disc="small", ngf=64, t_emb_dim=128, attn_scale=2, num_steps=4, votes=5,
    ),
    # The shipped default nuclei model: the chest X-ray U-Net layout on RGB input with a 128-wide
    # latent mapping, 7.3 M parameters (13.9 MiB in float16), 39.5 GFLOP per 256x256 forward.
    "monuseg_s": ModelConfig(
        name="monuseg_s", img_channels=3, mask_channels=1, image_size=256,
        norm_mean=MONUSEG_MEAN, norm_std=MONUSEG_STD, mpp=0.5,
        nf=32, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1, attn_resolutions=(16,),
        cond_enc_layers=3, cond_enc_num_res_blocks=2, nz=100, zdim=128, n_mlp=3,
        disc="large", ngf=64, t_emb_dim=256, attn_scale=3, num_steps=4, votes=5,
    ),
    # Not a published model: small enough that a forward pass takes milliseconds on a CPU.
    "tiny": ModelConfig(
        name="tiny", img_channels=3, mask_channels=1, image_size=64,
        norm_mean=MONUSEG_MEAN, norm_std=MONUSEG_STD, mpp=0.5,
        nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
        cond_enc_layers=1, cond_enc_num_res_blocks=1, nz=8, zdim=32, n_mlp=1,
        disc="small", ngf=8, t_emb_dim=32, attn_scale=2, num_steps=2, votes=2,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """Return a preset by name, optionally with some fields replaced."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
    return cfg.replace(**overrides) if overrides else cfg


def load_config(path: str | Path) -> ModelConfig:
    """Read a model config from a JSON file (the ``model`` section if it is a weights config)."""
    text = Path(path).read_text()
    data = json.loads(text)
    if isinstance(data, dict) and "model" in data:
        data = data["model"]
    return ModelConfig.from_dict(data)

