"""Export of the unrolled fixed-step sampler as an ONNX graph, and reading a graph's metadata.

The graph is :class:`~cdal_fast.sampling.sampler.FixedStepSampler` unrolled over its T steps and V
votes (for a one-pass model, :class:`~cdal_fast.sampling.one_pass.OnePassSampler`: one forward, no
noise inputs) with the noise as explicit inputs (standard ONNX ops only, opset 18: group norm as
float32 ``GroupNormalization`` in reduced-precision graphs, ``InstanceNormalization`` in float32
ones), so its results are reproducible and comparable with the PyTorch sampler on the same noise:

    inputs  image (B, C_img, S, S) normalised, x_init (V*B, C_mask, S, S), z (T, V*B, nz),
            post (T, V*B, C_mask, S, S)                              (B is dynamic)
    outputs prob (B, C_mask, S, S), std (B, C_mask, S, S)

With test-time augmentation (``tta``) the per-vote dihedral transforms are part of the graph (plain
``Transpose`` / ``Slice``), recorded as ``cdal_tta`` in the metadata; the graph stays square-only.
The metadata also records the weights hash, T, V, tile size, preset and precision, so a runtime can
refuse a graph that does not match the model it is asked to run (:mod:`.onnx_tensorrt`).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from ..atomic import atomic_output
from ..network.generator import Generator
from ..sampling.one_pass import sampler_for
from ..sampling.sampler import draw_noise, generators_from_seed
from .onnx_groupnorm import GROUP_NORM_OPSET, group_normalization_export
from .requires import BackendError

__all__ = ["INPUTS", "OUTPUTS", "GRAPH_FORMAT", "EXPORT_DTYPES", "export_copy", "export_onnx", "onnx_metadata",
           "read_meta"]

INPUTS = ["image", "x_init", "z", "post"]
OUTPUTS = ["prob", "std"]


def _meta(generator: Generator, steps: int, votes: int, size: int, weights_sha256: str,
          tta: bool = False) -> dict[str, str]:
    return {"cdal_preset": generator.cfg.name, "cdal_steps": str(steps), "cdal_votes": str(votes),
            "cdal_size": str(size), "cdal_weights_sha256": weights_sha256,
            "cdal_model_config": generator.cfg.to_json(), "cdal_tta": str(int(tta))}


# Bumped whenever the exported graph changes for the same weights (2: float32 graphs use
# InstanceNormalization); a cached graph of another format is exported again.
GRAPH_FORMAT = "2"
ONNX_OPSET = GROUP_NORM_OPSET  # GroupNormalization (float32 statistics) instead of InstanceNormalization
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_copy(generator: Generator, dtype: torch.dtype = torch.float32) -> Generator:
    """A plain-op CPU copy of ``generator`` in ``dtype``, built fresh so that exporting never moves,
    casts or re-fuses the caller's model (``segment`` may hold it on a GPU in bfloat16)."""
    copy = Generator(generator.cfg)
    copy.load_state_dict(generator.state_dict())  # copy_ brings the tensors to the CPU and float32
    return copy.to(dtype=dtype).set_fused(False).eval()


class _TypedSampler(torch.nn.Module):
    """The sampler with float32 inputs and outputs around a ``dtype`` generator, so that a reduced
    precision graph (strongly typed TensorRT) keeps the interface of the float32 one."""

    def __init__(self, sampler: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.sampler, self.dtype = sampler, dtype

    def forward(self, image: torch.Tensor, x_init: torch.Tensor, z: torch.Tensor,
                post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler(image.to(self.dtype), x_init, z, post)


def export_onnx(generator: Generator, out: str | Path, steps: int | None = None, votes: int | None = None,
                size: int | None = None, batch: int = 1, weights_sha256: str = "", precision: str = "fp32",
                tta: bool = False) -> Path:
    """Write the unrolled sampler as ONNX (plain ops; the fused custom ops are not used).

    The graph is traced on the CPU from :func:`export_copy` (``precision`` sets its weights and
    activations; inputs and outputs stay float32, group-norm statistics float32), so ``generator``
    may live on any device in any dtype and is left exactly as it was. ``tta`` bakes test-time
    augmentation into the graph.

    Group norms: reduced-precision graphs (TensorRT) get float32 ``GroupNormalization``
    (:mod:`cdal_fast.runtime.onnx_groupnorm`); float32 graphs keep the exporter's Reshape +
    ``InstanceNormalization`` + Reshape, already float32, which onnxruntime's CPU provider runs as
    one kernel where it expands ``GroupNormalization`` into about ten elementwise nodes (1.7x
    faster for a (5, 32, 256, 256) group norm + SiLU; group norms were half of the graph's time).
    """
    import onnx

    if precision not in EXPORT_DTYPES:
        raise BackendError(f"ONNX export precision must be one of {', '.join(EXPORT_DTYPES)}, got {precision!r}")
    sampler = sampler_for(export_copy(generator), steps, votes, tta=tta).to(EXPORT_DTYPES[precision]).eval()
    cfg = generator.cfg
    s = size or cfg.image_size
    n = draw_noise(sampler.num_steps, sampler.votes, cfg.mask_channels, cfg.nz, s, s, generators_from_seed(0, batch))
    image = torch.zeros(batch, cfg.img_channels, s, s)
    dyn = {"image": {0: "batch"}, "x_init": {0: "vb"}, "z": {1: "vb"}, "post": {1: "vb"},
           "prob": {0: "batch"}, "std": {0: "batch"}}
    meta = _meta(generator, sampler.num_steps, sampler.votes, s, weights_sha256, tta)
    meta["cdal_precision"] = precision
    meta["cdal_graph_format"] = GRAPH_FORMAT
    with atomic_output(out) as tmp:
        float_norms = group_normalization_export(ONNX_OPSET) if precision != "fp32" else contextlib.nullcontext()
        with torch.no_grad(), float_norms, warnings.catch_warnings():
            # the tracer warns at Python branches on shapes: TTA's square-tile check (spatial size is
            # fixed in this graph, so it is exact) and group norm's batch-size sanity check (true for
            # every batch); silenced for those two places only, so a new shape branch still warns
            for module in (r"cdal_fast\.sampling\.dihedral", r"torch\.nn\.functional"):
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=module)
            torch.onnx.export(_TypedSampler(sampler, EXPORT_DTYPES[precision]), (image, n.x_init, n.z, n.post),
                              str(tmp), input_names=INPUTS, output_names=OUTPUTS, dynamic_axes=dyn,
                              opset_version=ONNX_OPSET, dynamo=False)
        model = onnx.load(str(tmp))
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(tmp))
    return Path(out)


def read_meta(props: dict[str, str], path: Path) -> dict[str, str]:
    missing = [k for k in ("cdal_steps", "cdal_votes", "cdal_size", "cdal_model_config") if k not in props]
    if missing:
        raise BackendError(f"{path}: not a cdal-fast sampler graph (missing metadata {', '.join(missing)})")
    return props


def onnx_metadata(path: Path) -> dict[str, str]:
    """The cdal metadata of an ONNX sampler graph (validated), read without running it."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return read_meta(props, path)


