"""Running exported sampler graphs: onnxruntime (:class:`OnnxSampler`) and TensorRT engines.

Graphs come from :mod:`.onnx_export` (and the cache of :mod:`.onnx_cache`); each runtime reads the
graph's metadata and refuses a graph exported from another model or other weights. TensorRT
engines (10.x and 11.x, strongly typed) are built from a graph exported in the engine's precision
and cached under a key of (graph bytes, batch profile, precision, TensorRT version, GPU name).

Both samplers are :class:`~cdal_fast.sampling.sampler.SamplerLike` (the attributes and call
signature of ``FixedStepSampler``), so ``segment`` streams batches through them unchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_output
from ..cache import cache_dir
from ..network.config import INFERENCE_FIELDS
from ..network.generator import Generator
from ..sampling.sampler import SAMPLER_ATTRS
from .onnx_export import INPUTS, OUTPUTS, onnx_metadata, read_meta
from .ort_options import tuned_session_options
from .requires import BackendError, require_tensorrt
from .tensorrt_plan import MIN_PROFILE_BATCH, check_call, check_input_shape, network_flags, profile_shapes, torch_dtype

__all__ = ["OnnxSampler", "TensorRTSampler", "build_tensorrt_engine", "onnx_providers", "DEFAULT_TRT_BATCH"]


def _set_sampler_attrs(module: torch.nn.Module, meta: dict[str, str]) -> None:
    """Make ``module`` a :class:`~cdal_fast.sampling.sampler.SamplerLike`: its attributes from the graph's metadata."""
    cfg = json.loads(meta["cdal_model_config"])
    values = {"num_steps": meta["cdal_steps"], "votes": meta["cdal_votes"], "mask_channels": cfg["mask_channels"],
              "nz": cfg["nz"]}
    for name in SAMPLER_ATTRS:
        setattr(module, name, int(values[name]))
    module.tta = meta.get("cdal_tta", "0") == "1"  # graphs from before TTA have no key: plain votes


def _check_matches(meta: dict[str, str], generator: Generator | None, sha256: str, path: Path) -> None:
    if generator is None:
        return
    exported = {k: v for k, v in json.loads(meta["cdal_model_config"]).items() if k not in INFERENCE_FIELDS}
    if exported != json.loads(json.dumps(generator.cfg.architecture_dict())):
        raise BackendError(f"{path} was exported from a different model (preset {meta.get('cdal_preset')!r}); "
                           "re-export it from these weights")
    if sha256 and meta.get("cdal_weights_sha256") and meta["cdal_weights_sha256"] != sha256:
        raise BackendError(f"{path} was exported from other weights (sha256 differs); re-export it")


CUDA_PROVIDER = "CUDAExecutionProvider"


def onnx_providers(device: torch.device | str) -> list:
    """onnxruntime's execution providers for ``device``, or a BackendError when this onnxruntime cannot
    run there: a plain ``onnxruntime`` wheel has only the CPU provider, and running a ``--device cuda``
    job on the CPU without saying so would be a silent 50x slowdown."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return ["CPUExecutionProvider"]
    if dev.type != "cuda":
        raise BackendError(f"the onnx backend runs on cpu or cuda, not {dev.type}")
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError("the onnx backend needs onnxruntime: pip install onnxruntime") from None
    available = ort.get_available_providers()
    if CUDA_PROVIDER not in available:
        raise BackendError(f"--backend onnx on {dev} needs onnxruntime-gpu ({CUDA_PROVIDER}); this onnxruntime "
                           f"offers {', '.join(available)}. Use --backend graphs / eager on the GPU, or --device cpu")
    return [(CUDA_PROVIDER, {"device_id": dev.index or 0}), "CPUExecutionProvider"]


class OnnxSampler(torch.nn.Module):
    """onnxruntime session with the FixedStepSampler interface (CPU, or CUDA with onnxruntime-gpu)."""

    def __init__(self, path: str | Path, generator: Generator | None = None, weights_sha256: str = "",
                 providers: list[str] | None = None, session_options: object | None = None) -> None:
        """``session_options``: an ``onnxruntime.SessionOptions``; default the tuned CPU settings of
        :func:`cdal_fast.runtime.ort_options.tuned_session_options` (denormals flushed, one thread per core)."""
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("the onnx backend needs onnxruntime: pip install onnxruntime") from None
        path = Path(path)
        if not path.is_file():
            raise BackendError(f"ONNX file not found: {path}")
        options = session_options if session_options is not None else tuned_session_options()
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            raise BackendError(f"{path}: not a valid ONNX model ({str(exc).splitlines()[0][:200]})") from None
        wanted = providers[0] if providers else "CPUExecutionProvider"
        wanted = wanted[0] if isinstance(wanted, tuple) else wanted
        if wanted not in self.session.get_providers():  # onnxruntime falls back to the CPU silently
            raise BackendError(f"{path}: onnxruntime could not start {wanted} (running: "
                               f"{', '.join(self.session.get_providers())})")
        meta = read_meta(dict(self.session.get_modelmeta().custom_metadata_map), path)
        _check_matches(meta, generator, weights_sha256, path)
        _set_sampler_attrs(self, meta)
        self.size = int(meta["cdal_size"])
        self.quantisation = meta.get("cdal_quantisation", "")  # "" for a float graph (onnx_quant.py sets it)
        # The exporter drops inputs the graph never reads (``post`` when no step adds posterior
        # noise, e.g. T = 1), and onnxruntime refuses feeds it does not declare: feed what it has.
        self.input_names = [i.name for i in self.session.get_inputs()]
        unknown = set(self.input_names) - set(INPUTS)
        if unknown:
            raise BackendError(f"{path}: unexpected graph inputs {sorted(unknown)} (expected a subset of {INPUTS})")

    def forward(self, image: torch.Tensor, x_init: torch.Tensor, z: torch.Tensor,
                post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.shape[-1] != self.size or image.shape[-2] != self.size:
            raise BackendError(f"ONNX sampler was exported for {self.size}x{self.size} tiles, got "
                               f"{tuple(image.shape[-2:])}")
        feeds = {k: np.ascontiguousarray(t.detach().float().cpu().numpy())
                 for k, t in zip(INPUTS, (image, x_init, z, post)) if k in self.input_names}
        prob, std = self.session.run(OUTPUTS, feeds)
        return torch.from_numpy(prob).to(image.device), torch.from_numpy(std).to(image.device)


# -- TensorRT ---------------------------------------------------------------------------------------

DEFAULT_TRT_BATCH = 8  # profile maximum when no batch is given: segment's GPU default batch


def engine_key(onnx_path: Path, precision: str, batches: tuple[int, int, int], trt_version: str, gpu: str) -> str:
    h = hashlib.sha256()
    h.update(Path(onnx_path).read_bytes())
    h.update(json.dumps([precision, list(batches), trt_version, gpu]).encode())
    return h.hexdigest()[:24]


def build_tensorrt_engine(onnx_path: str | Path, precision: str = "fp16", max_batch: int = DEFAULT_TRT_BATCH,
                          cache: Path | None = None) -> Path:
    """Build (or reuse from the cache) a strongly typed engine for batches of 1..``max_batch`` tiles.

    ``onnx_path`` must be a graph exported with ``precision`` (``export_onnx(..., precision=...)``):
    the layers run in the types the graph gives them (see :mod:`cdal_fast.runtime.tensorrt_plan`).
    """
    trt = require_tensorrt()
    onnx_path = Path(onnx_path)
    meta = onnx_metadata(onnx_path)
    graph_precision = meta.get("cdal_precision", "fp32")
    if graph_precision != precision:
        raise BackendError(f"{onnx_path} was exported in {graph_precision}, not {precision}; export it with "
                           f"precision={precision!r} (TensorRT runs each layer in the graph's own type)")
    flags = network_flags(trt)  # also refuses unsupported TensorRT versions
    votes = int(meta["cdal_votes"])
    gpu = torch.cuda.get_device_name(torch.cuda.current_device())
    cache = cache or cache_dir() / "engines"
    cache.mkdir(parents=True, exist_ok=True)
    batches = (MIN_PROFILE_BATCH, max_batch, max_batch)
    out = cache / f"{onnx_path.stem}-{engine_key(onnx_path, precision, batches, trt.__version__, gpu)}.engine"
    if out.is_file():
        return out
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        profile.set_shape(t.name, *profile_shapes(t.name, tuple(t.shape), votes, max_batch))
    if config.add_optimization_profile(profile) < 0:
        raise BackendError(f"TensorRT refused the optimisation profile for batches 1..{max_batch} of {onnx_path}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {onnx_path}")
    with atomic_output(out) as tmp:
        tmp.write_bytes(bytes(serialized))
    return out


class TensorRTSampler(torch.nn.Module):
    """A deserialised engine driven with torch CUDA tensors (FixedStepSampler interface).

    Inputs and outputs are typed and shaped by the engine; it runs on a stream of its own that
    waits for PyTorch's current stream and is waited for by it, so it neither serialises with
    unrelated work on the legacy default stream nor races the tensors PyTorch produced.
    """

    def __init__(self, engine_path: str | Path, onnx_path: str | Path) -> None:
        super().__init__()
        self.trt = require_tensorrt()
        engine_path = Path(engine_path)
        try:
            runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
            self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        except Exception as exc:
            raise BackendError(f"{engine_path}: not a usable TensorRT engine ({exc})") from None
        if self.engine is None:
            raise BackendError(f"{engine_path}: not a usable TensorRT engine (built by another TensorRT version "
                               "or for another GPU?); delete it to rebuild")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{engine_path}: TensorRT could not create an execution context (GPU memory?)")
        self.stream = torch.cuda.Stream()
        _set_sampler_attrs(self, onnx_metadata(Path(onnx_path)))

    def forward(self, image: torch.Tensor, x_init: torch.Tensor, z: torch.Tensor,
                post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device("cuda", torch.cuda.current_device())
        feeds = {}
        for name, t in zip(INPUTS, (image, x_init, z, post)):
            t = t.to(device, torch_dtype(self.trt, self.engine.get_tensor_dtype(name))).contiguous()
            feeds[name] = t
            check_input_shape(self.context.set_input_shape(name, tuple(t.shape)), name, tuple(t.shape),
                              tuple(self.engine.get_tensor_profile_shape(name, 0)))
            check_call(self.context.set_tensor_address(name, t.data_ptr()), f"set_tensor_address({name!r})")
        outs = {}
        for name in OUTPUTS:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            outs[name] = torch.empty(shape, device=device, dtype=dtype)
            check_call(self.context.set_tensor_address(name, outs[name].data_ptr()), f"set_tensor_address({name!r})")
        current = torch.cuda.current_stream(device)
        self.stream.wait_stream(current)
        check_call(self.context.execute_async_v3(self.stream.cuda_stream), "execute_async_v3")
        current.wait_stream(self.stream)
        return outs["prob"].float(), outs["std"].float()
