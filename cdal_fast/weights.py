"""Safe weights I/O: safetensors tensors + a JSON config beside them.

``NAME.safetensors`` holds the generator's state dict; ``NAME.json`` holds the model config
(preset, schedule, normalisation statistics, resolution) and the training provenance. Nothing is
unpickled. A model larger than a per-file cap (the package ships files of at most 16 MiB) is
written as ``NAME.safetensors`` plus ``NAME.part2.safetensors``, ... listed with their SHA-256 in
the JSON's ``parts``; the loader reads them all. Every failure mode a user can hit (missing
file, truncated file, a file that is not safetensors, weights that do not fit the config)
raises :class:`WeightsError` naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_output
from .config import ConfigError, ModelConfig
from .generator import Generator

__all__ = ["WeightsError", "ModelBundle", "save_weights", "load_weights", "weights_paths", "file_sha256"]

FORMAT = "cdal-fast-weights"
FORMAT_VERSION = 1


class WeightsError(RuntimeError):
    """A weights file or its config cannot be used."""


@dataclass
class ModelBundle:
    """A loaded generator with everything needed to run it."""

    generator: Generator
    config: ModelConfig
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str = ""
    files: list[Path] = field(default_factory=list)  # the tensors' files: path, then any .partN shards


def weights_paths(path: str | Path) -> tuple[Path, Path]:
    """Map ``x``, ``x.safetensors`` or ``x.json`` to the (tensors, config) pair."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_suffix(".safetensors"), p.with_suffix(".json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def part_path(st_path: Path, index: int) -> Path:
    """File of shard ``index`` (1 = ``st_path`` itself, 2 = ``NAME.part2.safetensors``, ...)."""
    return st_path if index == 1 else st_path.with_name(f"{st_path.stem}.part{index}.safetensors")


def split_state(state: dict[str, torch.Tensor], max_file_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Group tensors in state-dict order into shards whose data stays under ``max_file_bytes``.

    The cap leaves 64 KiB for each file's JSON header. One tensor larger than the cap is an error:
    it could never be shipped within the limit.
    """
    if max_file_bytes is None:
        return [state]
    budget = max_file_bytes - (64 << 10)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in state.items():
        size = t.numel() * t.element_size()
        if size > budget:
            raise WeightsError(f"tensor {name} ({size} bytes) does not fit in a {max_file_bytes}-byte file")
        if used + size > budget and shards[-1]:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += size
    return shards


def save_weights(path: str | Path, generator: Generator, provenance: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float16, max_file_bytes: int | None = None) -> tuple[Path, Path]:
    """Write ``path.safetensors`` (tensors cast to ``dtype``) and ``path.json`` atomically.

    With ``max_file_bytes`` the tensors are spread over as many ``.partN`` files as needed; the
    JSON is written last, so a reader never sees an index whose parts are not complete.
    """
    st_path, cfg_path = weights_paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in generator.state_dict().items()}
    parts = []
    for index, shard in enumerate(split_state(state, max_file_bytes), start=1):
        target = part_path(st_path, index)
        with atomic_output(target) as tmp:
            save_file(shard, str(tmp), metadata={"format": FORMAT, "preset": generator.cfg.name})
        parts.append({"file": target.name, "sha256": file_sha256(target)})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "preset": generator.cfg.name,
        "dtype": str(dtype).replace("torch.", ""),
        "sha256": parts[0]["sha256"],
        "model": generator.cfg.to_dict(),
        "provenance": provenance or {},
    }
    if len(parts) > 1:
        meta["parts"] = parts[1:]
    with atomic_output(cfg_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return st_path, cfg_path


def _check_safetensors_file(path: Path) -> None:
    """Validate the header and size so truncation and foreign files get a precise message."""
    size = path.stat().st_size
    if size < 8:
        raise WeightsError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len <= 0 or header_len > min(size - 8, 100 << 20):
            raise WeightsError(f"{path}: not a safetensors file (invalid header length {header_len})")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (header is not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise WeightsError(f"{path}: not a safetensors file (bad entry for {name!r})") from None
    expected = 8 + header_len + end
    if size < expected:
        raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, header promises {expected})")


def _listed_parts(meta: dict[str, Any], st_path: Path, cfg_path: Path) -> list[Path]:
    """The extra shard files named in the config, which must sit beside the weights."""
    parts = meta.get("parts", [])
    if not isinstance(parts, list):
        raise WeightsError(f"{cfg_path}: 'parts' must be a list of shard files")
    files = []
    for index, entry in enumerate(parts, start=2):
        expected = part_path(st_path, index)
        if not isinstance(entry, dict) or entry.get("file") != expected.name:
            raise WeightsError(f"{cfg_path}: shard {index} must be {expected.name}, found {entry!r}")
        if not expected.is_file():
            raise WeightsError(f"weights shard not found: {expected} (listed in {cfg_path.name})")
        files.append(expected)
    return files


def load_weights(path: str | Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load a generator from ``path`` (with or without extension); strict about every mismatch."""
    st_path, cfg_path = weights_paths(path)
    if not st_path.is_file():
        raise WeightsError(f"weights file not found: {st_path}")
    if not cfg_path.is_file():
        raise WeightsError(f"config file not found beside the weights: {cfg_path}")
    try:
        meta = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{cfg_path}: not a valid JSON config ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise WeightsError(f"{cfg_path}: not a cdal-fast weights config (missing format/model keys)")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (ConfigError, TypeError) as exc:
        raise WeightsError(f"{cfg_path}: invalid model config: {exc}") from None

    state: dict[str, torch.Tensor] = {}
    files = [st_path, *_listed_parts(meta, st_path, cfg_path)]
    for file in files:
        _check_safetensors_file(file)
        try:
            state.update(load_file(str(file)))
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"{file}: cannot read safetensors data ({exc})") from None

    gen = Generator(cfg)
    expected = gen.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise WeightsError(f"{st_path} does not match its config (preset {cfg.name!r}): " + "; ".join(parts))
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise WeightsError(
                f"{st_path} does not match its config (preset {cfg.name!r}): tensor {name} has shape "
                f"{tuple(state[name].shape)}, expected {tuple(ref.shape)}"
            )
    gen.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    gen.eval().to(device=device, dtype=dtype)
    return ModelBundle(gen, cfg, dict(meta.get("provenance", {})), st_path, meta.get("sha256", ""), files)
