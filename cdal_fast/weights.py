"""Safe weights I/O: safetensors tensors + a JSON config beside them.

``NAME.safetensors`` holds the generator's state dict; ``NAME.json`` holds the model config
(preset, schedule, normalisation statistics, resolution) and the training provenance. Nothing is
unpickled. A model larger than a per-file cap (the package ships files of at most 16 MiB) is
written as ``NAME.safetensors`` plus ``NAME.part2.safetensors``, ... listed with their SHA-256 in
the JSON's ``parts``; the loader reads them all. Every failure mode a user can hit (missing
file, truncated file, a file that is not safetensors, weights that do not fit the config)
raises :class:`WeightsError` naming the problem.

Every file's SHA-256 is recomputed while it is read and compared with the one the JSON records,
so a swapped ``.safetensors`` beside an unchanged JSON is refused; only a bundle whose hashes were
checked carries a ``sha256`` (provenance and caches key on it, so they record facts, not claims).
Companion names are derived by stripping only the known suffixes: ``model.v2.safetensors`` pairs
with ``model.v2.json``, never with ``model.json``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from .atomic import atomic_output
from .hashing import file_sha256, read_with_sha256
from .network.config import ConfigError, ModelConfig
from .network.generator import Generator

__all__ = ["WeightsError", "ModelBundle", "save_weights", "load_weights", "weights_paths", "base_name", "file_sha256"]

FORMAT = "cdal-fast-weights"
FORMAT_VERSION = 1
TENSORS_SUFFIX = ".safetensors"
CONFIG_SUFFIX = ".json"


class WeightsError(RuntimeError):
    """A weights file or its config cannot be used."""


@dataclass
class ModelBundle:
    """A loaded generator with everything needed to run it."""

    generator: Generator
    config: ModelConfig
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str = ""  # the main file's SHA-256, set only when every file's recorded hash was checked
    files: list[Path] = field(default_factory=list)  # the tensors' files: path, then any .partN shards
    verified: bool = False  # True when every file hashed to the value its JSON records
    file_sha256s: list[str] = field(default_factory=list)  # verified hash of each entry of ``files``

    @property
    def content_sha256(self) -> str:
        """One verified hash over all tensor files ("" when unverified): the key for caches.

        For a single file it is that file's hash; for a sharded model it also covers every shard,
        so two models that share a first file but differ in a shard never share a cache entry.
        """
        if not self.verified:
            return ""
        if len(self.file_sha256s) == 1:
            return self.file_sha256s[0]
        return hashlib.sha256(",".join(self.file_sha256s).encode()).hexdigest()


def base_name(path: Path) -> Path:
    """``path`` without a trailing ``.safetensors``/``.json``; every other dot is part of the name."""
    for suffix in (TENSORS_SUFFIX, CONFIG_SUFFIX):
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def weights_paths(path: str | Path) -> tuple[Path, Path]:
    """Map ``x``, ``x.safetensors`` or ``x.json`` to the (tensors, config) pair.

    ``Path.with_suffix`` would treat ``model.v2`` or ``cdal-1.5`` as having a suffix and pair them
    with another model's files, so only the two known suffixes are stripped and appended.
    """
    base = base_name(Path(path))
    return base.with_name(base.name + TENSORS_SUFFIX), base.with_name(base.name + CONFIG_SUFFIX)


def part_path(st_path: Path, index: int) -> Path:
    """File of shard ``index`` (1 = ``st_path`` itself, 2 = ``NAME.part2.safetensors``, ...)."""
    if index == 1:
        return st_path
    base = base_name(st_path)
    return base.with_name(f"{base.name}.part{index}{TENSORS_SUFFIX}")


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


def _listed_parts(meta: dict[str, Any], st_path: Path, cfg_path: Path) -> list[tuple[Path, str]]:
    """The extra shard files named in the config (beside the weights) with their recorded hashes."""
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
        files.append((expected, _recorded_hash(entry.get("sha256"), cfg_path, f"parts[{index - 2}].sha256")))
    return files


def _recorded_hash(value: Any, cfg_path: Path, key: str) -> str:
    """A recorded SHA-256 as lower-case hex; "" when the config records none (legacy, unverified)."""
    if value is None or value == "":
        return ""
    text = str(value).lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise WeightsError(f"{cfg_path}: {key} must be a 64-digit hex SHA-256, got {value!r}")
    return text


def _read_verified(file: Path, recorded: str, cfg_path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read ``file`` once (:func:`cdal_fast.hashing.read_with_sha256`), check the hash, parse those same bytes."""
    data, actual = read_with_sha256(file)
    if recorded and actual != recorded:
        raise WeightsError(f"{file}: SHA-256 mismatch: the file hashes to {actual} but {cfg_path.name} records "
                           f"{recorded}; the weights were replaced or corrupted (re-download or re-export them)")
    try:
        return load_bytes(data), actual
    except Exception as exc:  # safetensors raises its own error types
        raise WeightsError(f"{file}: cannot read safetensors data ({exc})") from None


def _check_tensor_values(state: dict[str, torch.Tensor], st_path: Path) -> None:
    """Weights must be finite floating-point numbers: anything else is a damaged or foreign file."""
    for name, t in state.items():
        if not t.is_floating_point():
            raise WeightsError(f"{st_path}: tensor {name} has dtype {str(t.dtype).replace('torch.', '')}; "
                               "weights must be floating point")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise WeightsError(f"{st_path}: tensor {name} holds {bad} NaN/Inf values of {t.numel()}")


def load_weights(path: str | Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load a generator from ``path`` (with or without extension); strict about every mismatch.

    Order matters: the config is validated (types and ranges) and every file's hash checked before
    the generator is built, so a hostile JSON cannot trigger a huge allocation.
    """
    st_path, cfg_path = weights_paths(path)
    if not st_path.is_file():
        raise WeightsError(f"weights file not found: {st_path}")
    if not cfg_path.is_file():
        raise WeightsError(f"config file not found beside the weights: {cfg_path}")
    try:
        meta = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{cfg_path}: not a valid JSON config ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("model"), dict):
        raise WeightsError(f"{cfg_path}: not a cdal-fast weights config (missing format/model keys)")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (ConfigError, TypeError) as exc:
        raise WeightsError(f"{cfg_path}: invalid model config: {exc}") from None

    state: dict[str, torch.Tensor] = {}
    listed = [(st_path, _recorded_hash(meta.get("sha256"), cfg_path, "sha256")),
              *_listed_parts(meta, st_path, cfg_path)]
    hashes = []
    for file, recorded in listed:
        _check_safetensors_file(file)
        tensors, actual = _read_verified(file, recorded, cfg_path)
        state.update(tensors)
        hashes.append(actual)
    verified = all(recorded for _, recorded in listed)
    files = [file for file, _ in listed]
    _check_tensor_values(state, st_path)

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
    provenance = meta.get("provenance", {})
    return ModelBundle(gen, cfg, dict(provenance) if isinstance(provenance, dict) else {}, st_path,
                       hashes[0] if verified else "", files, verified, hashes if verified else [])
