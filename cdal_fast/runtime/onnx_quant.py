"""Static int8 sampler graphs (``--backend onnx_int8``) for CPUs with VNNI, cached like the float32 ones.

The float32 sampler graph (:mod:`.onnx_cache`) is quantised once per model with onnxruntime's static
quantisation: QDQ format, per-channel int8 convolution weights, uint8 activations whose ranges are
calibrated by running the float32 graph on a few real tiles with seeded noise. The convolutions
that see raw pixels or produce the sample (``cond_in``, ``conv_in``, ``head_conv``:
:data:`KEPT_FLOAT`) stay float32: they are where the error of an 8-bit grid lands directly in the
mask. Why VNNI only: without it onnxruntime's uint8 x int8 convolutions go through instructions
that saturate intermediate sums, and the masks drift (measured: Dice 0.971 against float32 on an
AVX2-only CPU, below the 0.99 a reduced-precision default must keep; see docs/benchmarks.md).

Calibration tiles: ``cdal_fast/models/calibration_monuseg.npz`` (crops of MoNuSeg *training* tiles,
resized to the model's tile size) unless the caller gives its own.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_output
from ..network.generator import Generator
from ..sampling.preprocess import normalise
from ..sampling.sampler import draw_noise, generators_from_seed
from .onnx_cache import cached_onnx
from .onnx_export import INPUTS
from .requires import BackendError

__all__ = ["KEPT_FLOAT", "CALIBRATION_FILE", "calibration_images", "cached_int8_onnx", "QUANT_VERSION"]

_log = logging.getLogger(__name__)  # one-time work worth a line (the CLI shows cdal_fast's INFO on stderr)

QUANT_VERSION = "1"  # bumped when the quantisation recipe changes: cached int8 graphs are made again
KEPT_FLOAT = ("cond_in", "conv_in", "head_conv")  # convolutions left in float32 (module docstring)
CALIBRATION_FILE = Path(__file__).resolve().parents[1] / "models" / "calibration_monuseg.npz"
CALIBRATION_SEED = 1000  # noise of the calibration runs (never a seed a user's tile gets by default)


def calibration_images(size: int, path: Path = CALIBRATION_FILE) -> list[np.ndarray]:
    """The bundled calibration crops (H, W, 3) uint8, resized to ``size``."""
    from PIL import Image

    with np.load(path) as data:
        crops = [data[k] for k in sorted(data.files)]
    return [np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR)) if c.shape[0] != size else c
            for c in crops]


def _feeds(generator: Generator, steps: int, votes: int, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    cfg = generator.cfg
    s = cfg.image_size
    feeds = []
    for i, rgb in enumerate(images):
        n = draw_noise(steps, votes, cfg.mask_channels, cfg.nz, s, s, generators_from_seed(CALIBRATION_SEED + i, 1))
        image = normalise(torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float(), cfg)
        feeds.append({k: t.numpy() for k, t in zip(INPUTS, (image, n.x_init, n.z, n.post))})
    return feeds


def cached_int8_onnx(generator: Generator, steps: int | None, votes: int | None, weights_sha256: str,
                     tta: bool = False, images: list[np.ndarray] | None = None) -> Path:
    """The model's static int8 sampler graph, quantised from the float32 one on first use and cached
    beside it (keyed by that graph, the calibration tiles, :data:`KEPT_FLOAT` and :data:`QUANT_VERSION`)."""
    try:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise BackendError("the onnx_int8 backend needs onnx and onnxruntime: pip install onnx onnxruntime") from None
    src = cached_onnx(generator, steps, votes, weights_sha256, tta=tta)
    images = images if images is not None else calibration_images(generator.cfg.image_size)
    key = hashlib.sha256(src.read_bytes())
    for img in images:
        key.update(np.ascontiguousarray(img).tobytes())
    key.update(repr((KEPT_FLOAT, QUANT_VERSION)).encode())
    out = src.with_name(f"{src.stem}-int8-{key.hexdigest()[:16]}.onnx")
    if out.is_file():
        return out
    t, v = steps or generator.cfg.num_steps, votes or generator.cfg.votes
    _log.info("quantising %s's sampler graph (T %d, V %d%s) to int8 once, calibrated on %d bundled crops (minutes "
              "on a small CPU); later runs reuse it", generator.cfg.name, t, v, ", TTA" if tta else "", len(images))
    t0 = time.monotonic()
    feeds = iter(_feeds(generator, t, v, images))

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feeds, None)

    src_model = onnx.load(str(src))
    kept = [n.name for n in src_model.graph.node if n.op_type == "Conv"
            and re.search(r"/(" + "|".join(KEPT_FLOAT) + r")(_\d+)?/Conv$", n.name)]
    prepared = out.with_name(f".{out.stem}.prepared.onnx")
    try:
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        with atomic_output(out) as tmp:
            quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv"], nodes_to_exclude=kept)
            quantised = onnx.load(str(tmp))
            del quantised.metadata_props[:]  # the graph's own metadata, so runtimes check it as any sampler graph
            for prop in src_model.metadata_props:
                quantised.metadata_props.add(key=prop.key, value=prop.value)
            quantised.metadata_props.add(key="cdal_quantisation", value=f"int8-static-qdq-v{QUANT_VERSION}")
            onnx.save(quantised, str(tmp))
    finally:
        prepared.unlink(missing_ok=True)
    _log.info("int8 graph built in %.0f s", time.monotonic() - t0)
    return out
