"""Compiled fixed-step samplers: an ONNX graph (run with onnxruntime) and a TensorRT engine.

The ONNX graph is the unrolled T-step, V-vote sampler of :class:`~cdal_fast.sampler.FixedStepSampler`
with the noise as explicit inputs (standard ONNX ops only, opset 17), so that its results are
reproducible and comparable with the PyTorch sampler on the same noise:

    inputs  image (B, C_img, S, S) normalised, x_init (V*B, C_mask, S, S), z (T, V*B, nz),
            post (T, V*B, C_mask, S, S)                              (B is dynamic)
    outputs prob (B, C_mask, S, S), std (B, C_mask, S, S)

The file's metadata records the weights hash, T, V, tile size and preset; loaders refuse a graph
that does not match the model they are asked to run. TensorRT engines are built from that graph
and cached under a key of (weights hash, shapes, precision, TensorRT version, GPU name).

Both samplers are :class:`~cdal_fast.sampler.SamplerLike` (the attributes and call signature of
``FixedStepSampler``), so ``segment`` streams batches through them unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_output
from .generator import Generator
from .requires import BackendError, require_tensorrt
from .sampler import SAMPLER_ATTRS, FixedStepSampler, draw_noise, generators_from_seed

__all__ = ["export_onnx", "OnnxSampler", "TensorRTSampler", "build_tensorrt_engine", "cache_dir"]

INPUTS = ["image", "x_init", "z", "post"]
OUTPUTS = ["prob", "std"]


def cache_dir() -> Path:
    root = os.environ.get("CDAL_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cdal-fast")
    return Path(root)


def _meta(generator: Generator, steps: int, votes: int, size: int, weights_sha256: str) -> dict[str, str]:
    return {"cdal_preset": generator.cfg.name, "cdal_steps": str(steps), "cdal_votes": str(votes),
            "cdal_size": str(size), "cdal_weights_sha256": weights_sha256,
            "cdal_model_config": generator.cfg.to_json()}


def export_onnx(generator: Generator, out: str | Path, steps: int | None = None, votes: int | None = None,
                size: int | None = None, batch: int = 1, weights_sha256: str = "") -> Path:
    """Write the unrolled sampler as ONNX (plain ops; the fused custom ops are not used).

    The graph is traced from a plain-op copy of ``generator``; the caller's fusion setting is kept.
    """
    import onnx

    sampler = FixedStepSampler(generator.with_fused(False), steps, votes).eval()
    cfg = generator.cfg
    s = size or cfg.image_size
    n = draw_noise(sampler.num_steps, sampler.votes, cfg.mask_channels, cfg.nz, s, s, generators_from_seed(0, batch))
    image = torch.zeros(batch, cfg.img_channels, s, s)
    dyn = {"image": {0: "batch"}, "x_init": {0: "vb"}, "z": {1: "vb"}, "post": {1: "vb"},
           "prob": {0: "batch"}, "std": {0: "batch"}}
    with atomic_output(out) as tmp:
        with torch.no_grad():
            torch.onnx.export(sampler, (image, n.x_init, n.z, n.post), str(tmp), input_names=INPUTS,
                              output_names=OUTPUTS, dynamic_axes=dyn, opset_version=17, dynamo=False)
        model = onnx.load(str(tmp))
        for k, v in _meta(generator, sampler.num_steps, sampler.votes, s, weights_sha256).items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(tmp))
    return Path(out)


def _read_meta(props: dict[str, str], path: Path) -> dict[str, str]:
    missing = [k for k in ("cdal_steps", "cdal_votes", "cdal_size", "cdal_model_config") if k not in props]
    if missing:
        raise BackendError(f"{path}: not a cdal-fast sampler graph (missing metadata {', '.join(missing)})")
    return props


def onnx_metadata(path: Path) -> dict[str, str]:
    """The cdal metadata of an ONNX sampler graph (validated), read without running it."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return _read_meta(props, path)


def _set_sampler_attrs(module: torch.nn.Module, meta: dict[str, str]) -> None:
    """Make ``module`` a :class:`~cdal_fast.sampler.SamplerLike`: its attributes from the graph's metadata."""
    cfg = json.loads(meta["cdal_model_config"])
    values = {"num_steps": meta["cdal_steps"], "votes": meta["cdal_votes"], "mask_channels": cfg["mask_channels"],
              "nz": cfg["nz"]}
    for name in SAMPLER_ATTRS:
        setattr(module, name, int(values[name]))


def _check_matches(meta: dict[str, str], generator: Generator | None, sha256: str, path: Path) -> None:
    if generator is None:
        return
    if json.loads(meta["cdal_model_config"]) != json.loads(generator.cfg.to_json()):
        raise BackendError(f"{path} was exported from a different model (preset {meta.get('cdal_preset')!r}); "
                           "re-export it from these weights")
    if sha256 and meta.get("cdal_weights_sha256") and meta["cdal_weights_sha256"] != sha256:
        raise BackendError(f"{path} was exported from other weights (sha256 differs); re-export it")


class OnnxSampler(torch.nn.Module):
    """onnxruntime session with the FixedStepSampler interface (CPU, or CUDA provider if present)."""

    def __init__(self, path: str | Path, generator: Generator | None = None, weights_sha256: str = "",
                 providers: list[str] | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("the onnx backend needs onnxruntime: pip install onnxruntime") from None
        path = Path(path)
        if not path.is_file():
            raise BackendError(f"ONNX file not found: {path}")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            raise BackendError(f"{path}: not a valid ONNX model ({str(exc).splitlines()[0][:200]})") from None
        meta = _read_meta(dict(self.session.get_modelmeta().custom_metadata_map), path)
        _check_matches(meta, generator, weights_sha256, path)
        _set_sampler_attrs(self, meta)
        self.size = int(meta["cdal_size"])

    def forward(self, image: torch.Tensor, x_init: torch.Tensor, z: torch.Tensor,
                post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.shape[-1] != self.size or image.shape[-2] != self.size:
            raise BackendError(f"ONNX sampler was exported for {self.size}x{self.size} tiles, got "
                               f"{tuple(image.shape[-2:])}")
        feeds = {k: np.ascontiguousarray(t.detach().float().cpu().numpy())
                 for k, t in zip(INPUTS, (image, x_init, z, post))}
        prob, std = self.session.run(OUTPUTS, feeds)
        return torch.from_numpy(prob).to(image.device), torch.from_numpy(std).to(image.device)


# -- TensorRT ---------------------------------------------------------------------------------------


def engine_key(onnx_path: Path, precision: str, batches: tuple[int, int, int], trt_version: str, gpu: str) -> str:
    h = hashlib.sha256()
    h.update(Path(onnx_path).read_bytes())
    h.update(json.dumps([precision, list(batches), trt_version, gpu]).encode())
    return h.hexdigest()[:24]


def build_tensorrt_engine(onnx_path: str | Path, precision: str = "fp16", batches: tuple[int, int, int] = (1, 8, 16),
                          cache: Path | None = None) -> Path:
    """Build (or reuse from the cache) a serialised engine with one optimisation profile."""
    trt = require_tensorrt()
    onnx_path = Path(onnx_path)
    gpu = torch.cuda.get_device_name(0)
    cache = cache or cache_dir() / "engines"
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{onnx_path.stem}-{engine_key(onnx_path, precision, batches, trt.__version__, gpu)}.engine"
    if out.is_file():
        return out
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    votes = int(onnx_metadata(onnx_path)["cdal_votes"])
    for i in range(network.num_inputs):
        t = network.get_input(i)
        axis = 0 if t.name in ("image", "x_init") else 1  # z and post are (T, V*B, ...)
        rows = 1 if t.name == "image" else votes  # vote-major inputs hold V * B rows
        shapes = []
        for b in batches:
            s = list(t.shape)
            s[axis] = rows * b
            shapes.append(tuple(s))
        profile.set_shape(t.name, *shapes)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {onnx_path}")
    with atomic_output(out) as tmp:
        tmp.write_bytes(bytes(serialized))
    return out


class TensorRTSampler(torch.nn.Module):
    """A deserialised engine driven with torch CUDA tensors (FixedStepSampler interface)."""

    def __init__(self, engine_path: str | Path, onnx_path: str | Path) -> None:
        super().__init__()
        trt = require_tensorrt()
        engine_path = Path(engine_path)
        try:
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        except Exception as exc:
            raise BackendError(f"{engine_path}: not a usable TensorRT engine ({exc})") from None
        if self.engine is None:
            raise BackendError(f"{engine_path}: not a usable TensorRT engine (built by another TensorRT version "
                               "or for another GPU?); delete it to rebuild")
        self.context = self.engine.create_execution_context()
        _set_sampler_attrs(self, onnx_metadata(Path(onnx_path)))

    def forward(self, image: torch.Tensor, x_init: torch.Tensor, z: torch.Tensor,
                post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feeds = dict(zip(INPUTS, (image, x_init, z, post)))
        for name, t in feeds.items():
            t = t.float().cuda().contiguous()
            feeds[name] = t
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        b, _, h, w = image.shape
        outs = {n: torch.empty(b, self.mask_channels, h, w, device="cuda") for n in OUTPUTS}
        for n, t in outs.items():
            self.context.set_tensor_address(n, t.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError("TensorRT execution failed")
        return outs["prob"], outs["std"]
