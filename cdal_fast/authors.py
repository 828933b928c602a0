"""Import the cDAL authors' released checkpoints (GitHub ``Hejrati/cDAL``) as cdal-fast weights.

The authors' generator is the same network as ours (spec section 4) with another module layout:
one flat ``all_modules`` list in construction order, attention q/k/v/out stored as "NIN" matrices
``W`` of shape (C_in, C_out) used as ``x @ W + b``, the latent mapping in ``z_transform`` and,
because they train under DistributedDataParallel, every key prefixed with ``module.``. This module
holds the three pieces an import needs, each checked so that a wrong file fails with a message
naming the key and the shapes rather than with a silently wrong model:

* :func:`config_from_args`: their argument namespace (their field names) -> :class:`ModelConfig`,
  including the preprocessing and mask polarity their data code used for the task;
* :func:`read_authors_state`: ``torch.load(weights_only=True)`` of a checkpoint, accepting a bare
  state dict or a resume file holding ``netG_dict``, with or without ``module.``;
* :func:`convert_generator_state` / :func:`convert_discriminator_state`: key and layout mapping.

:func:`import_checkpoint` ties them together and writes ``NAME.safetensors`` + ``NAME.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .network.config import ConfigError, ModelConfig
from .network.discriminator import Discriminator
from .network.generator import Generator
from .network.layers import CondBlock, ResBlock, SelfAttention
from .tasks import TASKS, get_task
from .weights import file_sha256, save_weights

__all__ = ["AuthorsCheckpointError", "TASK_OF_DATASET", "config_from_args", "read_args", "read_authors_state",
           "convert_generator_state", "convert_discriminator_state", "import_checkpoint", "generator_key_map"]

DDP_PREFIX = "module."
# The authors' ``dataset`` argument decides the task; each task's record (:mod:`cdal_fast.tasks`) holds
# their data code's facts: image channels, normalisation, mask polarity, test votes, resolution.
TASK_OF_DATASET = {t.authors_dataset: t.name for t in TASKS.values()}
# Fields of their namespace that must hold these values for the network to be the one we build.
REQUIRED_ARGS = {"resblock_type": "biggan", "progressive": "none", "progressive_input": "residual",
                 "progressive_combine": "sum", "embedding_type": "positional", "fir": True,
                 "skip_rescale": True, "not_use_tanh": False}
OPTIMISER_KEYS = {"state", "param_groups"}
DISCRIMINATOR_MARKERS = ("t_embed.", "start_conv.", "final_conv.", "end_linear.")


class AuthorsCheckpointError(ValueError):
    """An authors' checkpoint or argument file that cannot be imported (the message says why)."""


# -- arguments -> config ----------------------------------------------------------------------
def read_args(path: str | Path) -> dict[str, Any]:
    """Read the authors' argument namespace saved as JSON."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise AuthorsCheckpointError(f"args file not found: {p}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuthorsCheckpointError(f"{p}: not a JSON argument file ({exc})") from None
    if not isinstance(data, dict):
        raise AuthorsCheckpointError(f"{p}: the argument file must hold a JSON object of the authors' fields")
    return data


def _arg(args: dict[str, Any], key: str, source: str) -> Any:
    if key not in args:
        raise AuthorsCheckpointError(f"{source}: field {key!r} is missing from the authors' arguments")
    return args[key]


def task_of_args(args: dict[str, Any], task: str | None = None, source: str = "args") -> str:
    """The cdal-fast task of an argument namespace; ``task`` overrides their ``dataset`` field."""
    if task is not None:
        if task not in TASKS:
            raise AuthorsCheckpointError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        return task
    dataset = str(args.get("dataset", ""))
    for prefix, name in TASK_OF_DATASET.items():
        if dataset.startswith(prefix):
            return name
    raise AuthorsCheckpointError(
        f"{source}: dataset {dataset!r} is not one of {', '.join(TASK_OF_DATASET)}; pass --task to say which")


def config_from_args(args: dict[str, Any], task: str | None = None, name: str | None = None,
                     source: str = "args") -> ModelConfig:
    """Translate the authors' argument namespace into our config (preprocessing of their data code)."""
    for key, want in REQUIRED_ARGS.items():
        if key in args and args[key] != want:
            raise AuthorsCheckpointError(
                f"{source}: {key}={args[key]!r} is not supported (the published cDAL models use {want!r})")
    t = get_task(task_of_args(args, task, source))
    try:
        return ModelConfig(
            name=name or f"authors_{t.name}",
            img_channels=t.img_channels,
            mask_channels=int(_arg(args, "num_channels", source)),
            image_size=int(_arg(args, "image_size", source)),
            norm_mean=t.norm_mean, norm_std=t.norm_std,
            mpp=t.mpp,
            nf=int(_arg(args, "num_channels_dae", source)),
            ch_mult=tuple(int(m) for m in _arg(args, "ch_mult", source)),
            num_res_blocks=int(_arg(args, "num_res_blocks", source)),
            attn_resolutions=tuple(int(r) for r in _arg(args, "attn_resolutions", source)),
            cond_enc_layers=int(_arg(args, "cond_enc_layers", source)),
            cond_enc_num_res_blocks=int(_arg(args, "cond_enc_num_res_blocks", source)),
            nz=int(_arg(args, "nz", source)),
            zdim=int(_arg(args, "z_emb_dim", source)),
            n_mlp=int(_arg(args, "n_mlp", source)),
            dropout=float(args.get("dropout", 0.0)),
            disc=t.disc,
            ngf=int(args.get("ngf", 64)),
            t_emb_dim=int(args.get("t_emb_dim", 256)),
            attn_scale=int(args.get("attn_scale", 3)),
            num_steps=int(_arg(args, "num_timesteps", source)),
            votes=t.test_votes,
            beta_min=float(args.get("beta_min", 0.1)),
            beta_max=float(args.get("beta_max", 20.0)),
            volume_scaling=t.volume_scaling,
            mask_polarity=t.mask_polarity,
            volume_orientation=t.volume_orientation,
        )
    except (ConfigError, TypeError, ValueError) as exc:
        if isinstance(exc, AuthorsCheckpointError):
            raise
        raise AuthorsCheckpointError(f"{source}: the authors' arguments do not give a valid model: {exc}") from None


# -- reading a checkpoint ---------------------------------------------------------------------
def _strip_ddp(state: dict[str, Any]) -> dict[str, Any]:
    if state and all(k.startswith(DDP_PREFIX) for k in state):
        return {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def read_authors_state(path: str | Path, what: str = "generator") -> dict[str, torch.Tensor]:
    """Load an authors' checkpoint safely (no code is unpickled) and return the network's tensors.

    Accepts a bare ``state_dict`` or a resume file holding ``netG_dict`` (``netD_dict`` for
    ``what="discriminator"``), with or without DistributedDataParallel's ``module.`` prefix.
    """
    p = Path(path)
    if not p.is_file():
        raise AuthorsCheckpointError(f"checkpoint not found: {p}")
    try:
        # Their resume files also pickle the argparse Namespace; allowing that one plain attribute
        # container keeps the load free of arbitrary code.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors have no common type
        raise AuthorsCheckpointError(
            f"{p}: not a PyTorch checkpoint of plain tensors (torch.load(weights_only=True) failed: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise AuthorsCheckpointError(f"{p}: holds a {type(obj).__name__}, not a state_dict")
    wrapper = "netG_dict" if what == "generator" else "netD_dict"
    if wrapper in obj:
        obj = obj[wrapper]
    elif OPTIMISER_KEYS <= set(obj):
        raise AuthorsCheckpointError(f"{p}: this is an optimiser state (keys 'state', 'param_groups'), "
                                     f"not the {what}'s weights")
    elif what == "generator" and "netD_dict" in obj:
        raise AuthorsCheckpointError(f"{p}: a resume file without 'netG_dict' (it holds the discriminator only)")
    if not isinstance(obj, dict):
        raise AuthorsCheckpointError(f"{p}: '{wrapper}' is not a state_dict")
    state = _strip_ddp(obj)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad or not state:
        raise AuthorsCheckpointError(
            f"{p}: not a state_dict of tensors" + (f" (e.g. {bad[0]!r} is not a tensor)" if bad else " (empty)"))
    if what == "generator" and any(k.startswith(DISCRIMINATOR_MARKERS) for k in state):
        raise AuthorsCheckpointError(f"{p}: this is a discriminator checkpoint (keys such as 't_embed.', "
                                     "'start_conv.'); import-checkpoint needs the generator (netG)")
    return state


# -- key mapping ------------------------------------------------------------------------------
# One entry per tensor of ours: (our key, authors' keys, how to build ours from theirs).
# "copy": the one authors' tensor as is; "nin": NIN matrices (C_in, C_out) -> 1x1 conv weights,
# several stacked along the output axis; "cat": biases stacked.
KeyRule = tuple[str, tuple[str, ...], str]


def _authors_order(gen: Generator) -> Iterator[tuple[str, nn.Module]]:
    """Our modules in the order of the authors' ``all_modules`` list, with their paths."""
    yield "temb0", gen.temb0
    yield "temb1", gen.temb1
    yield "cond_in", gen.cond_in
    for i, block in enumerate(gen.cond_blocks):
        yield f"cond_blocks.{i}", block
    yield "conv_in", gen.conv_in
    for li, level in enumerate(gen.down_levels):
        for ui, unit in enumerate(level.units):
            yield f"down_levels.{li}.units.{ui}.block", unit.block
            if unit.attn is not None:
                yield f"down_levels.{li}.units.{ui}.attn", unit.attn
        if level.down is not None and level.pyramid is not None:
            yield f"down_levels.{li}.down", level.down
            yield f"down_levels.{li}.pyramid", level.pyramid
    yield "mid0", gen.mid0
    yield "mid_attn", gen.mid_attn
    yield "mid1", gen.mid1
    for li, level in enumerate(gen.up_levels):
        for bi, block in enumerate(level.blocks):
            yield f"up_levels.{li}.blocks.{bi}", block
        if level.attn is not None:
            yield f"up_levels.{li}.attn", level.attn
        if level.up is not None:
            yield f"up_levels.{li}.up", level.up
    yield "head_norm", gen.head_norm
    yield "head_conv", gen.head_conv


RESBLOCK_NAMES = {"norm0.style": "GroupNorm_0.style", "conv0": "Conv_0", "temb_proj": "Dense_0",
                  "norm1.style": "GroupNorm_1.style", "conv1": "Conv_1", "skip": "Conv_2"}
CONDBLOCK_NAMES = {"norm0": "0.in_layers.0", "conv0": "0.in_layers.2", "norm1": "0.out_layers.0",
                   "conv1": "0.out_layers.3"}


def _module_rules(ours: str, theirs: str, module: nn.Module) -> list[KeyRule]:
    wb = ("weight", "bias")
    if isinstance(module, SelfAttention):
        nin = [f"{theirs}.NIN_{i}" for i in range(4)]
        return [(f"{ours}.norm.weight", (f"{theirs}.GroupNorm_0.weight",), "copy"),
                (f"{ours}.norm.bias", (f"{theirs}.GroupNorm_0.bias",), "copy"),
                (f"{ours}.qkv.weight", tuple(f"{n}.W" for n in nin[:3]), "nin"),
                (f"{ours}.qkv.bias", tuple(f"{n}.b" for n in nin[:3]), "cat"),
                (f"{ours}.proj.weight", (f"{nin[3]}.W",), "nin"),
                (f"{ours}.proj.bias", (f"{nin[3]}.b",), "copy")]
    if isinstance(module, ResBlock):
        names = {k: v for k, v in RESBLOCK_NAMES.items() if k != "skip" or module.skip is not None}
        return [(f"{ours}.{a}.{s}", (f"{theirs}.{b}.{s}",), "copy") for a, b in names.items() for s in wb]
    if isinstance(module, CondBlock):
        return [(f"{ours}.{a}.{s}", (f"{theirs}.{b}.{s}",), "copy") for a, b in CONDBLOCK_NAMES.items() for s in wb]
    if hasattr(module, "conv") and isinstance(module.conv, nn.Conv2d):  # the input pyramid's FIR conv
        return [(f"{ours}.conv.{s}", (f"{theirs}.Conv2d_0.{s}",), "copy") for s in wb]
    return [(f"{ours}.{s}", (f"{theirs}.{s}",), "copy") for s in wb]


def generator_key_map(gen: Generator) -> list[KeyRule]:
    """Every tensor of our generator with the authors' key(s) it comes from."""
    rules: list[KeyRule] = []
    for index, (ours, module) in enumerate(_authors_order(gen)):
        rules += _module_rules(ours, f"all_modules.{index}", module)
    for i, layer in enumerate(gen.mapping):
        if isinstance(layer, nn.Linear):
            rules += [(f"mapping.{i}.{s}", (f"z_transform.{i}.{s}",), "copy") for s in ("weight", "bias")]
    return rules


def discriminator_key_map(disc: Discriminator) -> list[KeyRule]:
    """Every tensor of our discriminator with the authors' key it comes from."""
    pairs = [("temb0", "t_embed.main.0"), ("temb1", "t_embed.main.2"), ("stem", "start_conv"),
             ("final_conv", "final_conv"), ("end_linear", "end_linear")]
    rules = [(f"{a}.{s}", (f"{b}.{s}",), "copy") for a, b in pairs for s in ("weight", "bias")]
    for i in range(len(disc.blocks)):
        ours, theirs = f"blocks.{i}", f"conv{i + 1}"
        for a, b in (("conv0", "conv1.0"), ("conv1", "conv2.0"), ("temb_proj", "dense_t1")):
            rules += [(f"{ours}.{a}.{s}", (f"{theirs}.{b}.{s}",), "copy") for s in ("weight", "bias")]
        rules.append((f"{ours}.skip.weight", (f"{theirs}.skip.0.weight",), "copy"))
    return rules


LISTED_KEYS = 20  # keys named in an error before it abbreviates


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:LISTED_KEYS]) + (f" ... ({len(keys) - LISTED_KEYS} more)" if len(keys) > LISTED_KEYS else "")


def _apply_rules(rules: list[KeyRule], state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                 source: str, layout: str) -> dict[str, torch.Tensor]:
    needed = [k for _, keys, _ in rules for k in keys]
    missing = [k for k in needed if k not in state]
    unexpected = sorted(set(state) - set(needed))
    if missing or unexpected:
        msg = [f"{source} does not fit the layout {layout}:"]
        if missing:
            msg.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        raise AuthorsCheckpointError(" ".join(msg) + " (do the args belong to this checkpoint?)")
    out: dict[str, torch.Tensor] = {}
    for ours, keys, how in rules:
        want = tuple(expected[ours].shape)
        if how == "nin":
            # conv weight (C_out, C_in, 1, 1) is the transpose of x @ W's (C_in, C_out)
            expect_each = (want[1], want[0] // len(keys))
            for k in keys:
                if tuple(state[k].shape) != expect_each:
                    raise AuthorsCheckpointError(
                        f"{source}: {DDP_PREFIX}{k} has shape {tuple(state[k].shape)}, the layout {layout} "
                        f"needs {expect_each}")
            value = torch.cat([state[k].t() for k in keys], 0)[:, :, None, None]
        elif how == "cat":
            value = torch.cat([state[k] for k in keys], 0)
        else:
            value = state[keys[0]]
        if tuple(value.shape) != want:
            raise AuthorsCheckpointError(
                f"{source}: {DDP_PREFIX}{keys[0]} has shape {tuple(value.shape)}, the layout {layout} needs "
                f"{want} (for {ours}); the args do not match the tensors")
        out[ours] = value.to(torch.float32).contiguous()
    return out


def describe(cfg: ModelConfig) -> str:
    return (f"(num_channels_dae={cfg.nf}, ch_mult={list(cfg.ch_mult)}, num_res_blocks={cfg.num_res_blocks}, "
            f"attn_resolutions={list(cfg.attn_resolutions)}, cond_enc={cfg.cond_enc_layers}x"
            f"{cfg.cond_enc_num_res_blocks}, nz={cfg.nz}, z_emb_dim={cfg.zdim}, n_mlp={cfg.n_mlp})")


def convert_generator_state(state: dict[str, torch.Tensor], cfg: ModelConfig, source: str = "checkpoint",
                            generator: Generator | None = None) -> dict[str, torch.Tensor]:
    """The authors' generator tensors (``module.`` already stripped) -> our state dict for ``cfg``.

    ``generator`` may be a network already built for ``cfg`` (e.g. on the meta device, to check a
    layout without allocating weights).
    """
    gen = generator if generator is not None else Generator(cfg)
    return _apply_rules(generator_key_map(gen), _strip_ddp(state), gen.state_dict(), source, describe(cfg))


def convert_discriminator_state(state: dict[str, torch.Tensor], cfg: ModelConfig,
                                source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The authors' discriminator tensors -> our :class:`Discriminator` state dict for ``cfg``."""
    disc = Discriminator(cfg)
    return _apply_rules(discriminator_key_map(disc), _strip_ddp(state), disc.state_dict(), source,
                        f"(disc={cfg.disc}, ngf={cfg.ngf}, t_emb_dim={cfg.t_emb_dim})")


# -- the import ---------------------------------------------------------------------------------
def import_checkpoint(checkpoint: str | Path, args_path: str | Path, out: str | Path, task: str | None = None,
                      dtype: torch.dtype = torch.float32, max_file_bytes: int | None = None) -> tuple[Path, Path]:
    """Convert an authors' generator checkpoint into ``OUT.safetensors`` + ``OUT.json``.

    Float32 by default (the released files are float32; pass float16 to halve the size). The
    provenance names the source file with its SHA-256 and marks the weights as the authors'.
    """
    ckpt = Path(checkpoint)
    args = read_args(args_path)
    cfg = config_from_args(args, task, name=Path(out).name, source=str(args_path))
    state = read_authors_state(ckpt)
    gen = Generator(cfg)
    gen.load_state_dict(convert_generator_state(state, cfg, source=str(ckpt), generator=gen))
    provenance = {
        "source": "authors",
        "authors_repository": "https://github.com/Hejrati/cDAL",
        "source_file": ckpt.name,
        "source_sha256": file_sha256(ckpt),
        "args_file": Path(args_path).name,
        "authors_args": args,
        "note": "Weights trained by the cDAL authors; checkpoint names carry test-set scores "
                "(the authors selected on the test set).",
    }
    return save_weights(out, gen, provenance, dtype=dtype, max_file_bytes=max_file_bytes)
