"""cdal-fast: fast inference, training and export for cDAL segmentation models.

Typical use::

    from cdal_fast import load_model, FixedStepSampler, sample
    bundle = load_model()                      # the shipped MoNuSeg model
    sampler = FixedStepSampler(bundle.generator)
    prob, std = sample(sampler, normalise(image_uint8, bundle.config), seed=0)
"""

from .models import default_weights, load_model
from .network import ops
from .network.config import PRESETS, ConfigError, ModelConfig, get_preset
from .network.discriminator import Discriminator
from .network.generator import Generator
from .sampling.preprocess import normalise
from .sampling.sampler import FixedStepSampler, SamplerNoise, decode_mask, draw_noise, sample
from .weights import ModelBundle, WeightsError, load_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    "ops", "PRESETS", "ConfigError", "ModelConfig", "get_preset", "Discriminator", "Generator",
    "default_weights", "load_model", "normalise", "FixedStepSampler", "SamplerNoise",
    "decode_mask", "draw_noise", "sample", "ModelBundle", "WeightsError", "load_weights",
    "save_weights", "__version__",
]
