"""Loading weights: official release files, their wrappers, and this project's Lightning checkpoints."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kbnet.errors import MissingFileError, UserError

WRAPPER_KEYS = ("params", "params_ema", "model", "net", "state_dict")
"""Keys under which the official releases (BasicSR ``params``/``params_ema``, SIDD ``model``, Gaussian ``net``) and
Lightning (``state_dict``) store the weights; the first present one is used unless ``key`` is given."""

SAFETENSORS_SUFFIX = ".safetensors"
LIGHTNING_PREFIX = "net."
"""Our LightningModules keep the backbone in the attribute ``net``."""


class WeightLoadError(UserError, ValueError, RuntimeError):
    """A weights file or checkpoint that cannot be read, or cannot give the requested model (tensors that do not
    fit, another preset, no EMA copy); the message names the file and what was expected. A ``ValueError`` (the
    content is not what was asked for) and a ``RuntimeError`` (what ``load_state_dict`` raises for tensors that do
    not fit), so callers catching either keep working. A missing file is a ``MissingFileError``."""


def _existing_file(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path``; a ``MissingFileError`` naming it when there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    return path


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The unpickled content of a PyTorch file (a checkpoint or bare weights), on the CPU.

    The zip format ``torch.save`` writes is memory-mapped, so reading a large checkpoint for one entry (its step,
    its config) is cheap; legacy files cannot be mapped and are read whole.
    """
    path = _existing_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(path))
    except Exception as err:
        raise WeightLoadError(f"cannot read checkpoint {path}: {type(err).__name__}: {err} "
                              "(truncated download or not a PyTorch file?)") from err


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` header (``kbnet-export`` stores the preset and config there)."""
    from safetensors import safe_open

    path = _existing_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:
        raise WeightLoadError(f"cannot read {path} as safetensors: {type(err).__name__}: {err}") from err


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = _existing_file(path)
    try:
        return load_file(str(path))
    except Exception as err:
        raise WeightLoadError(f"cannot read {path} as safetensors: {type(err).__name__}: {err} "
                              "(truncated download?)") from err


def _read(source: str | os.PathLike | Mapping, key: str | None) -> tuple[dict[str, torch.Tensor], str]:
    name = "<mapping>"
    if isinstance(source, str | os.PathLike):
        name = str(source)
        path = Path(source)
        if path.suffix.lower() == SAFETENSORS_SUFFIX:
            return _read_safetensors(path), name
        source = read_checkpoint(path)
    if not isinstance(source, Mapping):
        raise WeightLoadError(f"{name}: expected a state dict or a dict wrapping one, got {type(source).__name__}")
    if key is not None:
        if key not in source:
            raise WeightLoadError(f"{name}: no key {key!r}; top-level keys: {sorted(source)[:20]}")
        source = source[key]
    elif not any(isinstance(v, torch.Tensor) for v in source.values()):
        found = next((k for k in WRAPPER_KEYS if isinstance(source.get(k), Mapping)), None)
        if found is None:
            raise WeightLoadError(f"{name}: no tensors and none of the wrapper keys {list(WRAPPER_KEYS)}; "
                                  f"top-level keys: {sorted(source)[:20]}")
        source = source[found]
    return dict(source), name


def _strip_prefixes(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` (DataParallel/DDP) or ``net.`` (our Lightning modules) prefix the model lacks.

    Keys without the prefix (a Lightning module's loss or metric buffers) do not belong to the backbone and are dropped.
    """
    for prefix in ("module.", LIGHTNING_PREFIX):
        if any(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in model_keys):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _likely_cause(mismatched: list[str], missing: list[str], unexpected: list[str]) -> str:
    """Guess which constructor argument differs from the names of the tensors that do not fit."""
    hints = []
    for name in mismatched:
        leaf = name.rsplit(".", 2)
        if name.endswith("conv11.1.weight"):
            hints.append("`lightweight` differs (5×5 grouped vs 3×3 depthwise spatial conv)")
        elif name.endswith(("conv4.weight", "conv5.weight")):
            hints.append("`ffn_scale` differs")
        elif name.endswith(("attn.w", "attn.b", "attn.ga1", "attn.project_out.weight")):
            hints.append("`ffn_expansion_factor` or `group_channels` differs")
        elif name.endswith((".w", ".b")) and leaf[-1] in ("w", "b"):
            hints.append("`nset`, `kernel_size` or `group_channels` differs")
        elif name in ("intro.weight", "ending.weight", "patch_embed.proj.weight", "output.weight"):
            hints.append("the number of image channels differs (colour vs gray preset)")
        elif name.endswith("temperature"):
            hints.append("`heads` differs")
        else:
            hints.append("the width (`width`/`dim`) differs")
    if missing or unexpected:
        if any(k.endswith("bias") for k in missing + unexpected) and not mismatched:
            hints.append("`bias` differs")
        hints.append("the number of blocks per level (`enc_blk_nums`/`dec_blk_nums`/`middle_blk_num` or "
                     "`num_blocks`/`num_refinement_blocks`) differs, or the checkpoint is for the other backbone "
                     "(KBNet_s vs KBNet_l)")
    unique = list(dict.fromkeys(hints))
    return "; ".join(unique[:3])


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping, strict: bool = True,
                 key: str | None = None) -> nn.Module:
    """Load a state dict into ``model`` from a file or mapping in any of the forms KBNet weights come in.

    Accepted: a raw state dict; a ``.safetensors`` file (official key names, as ``kbnet-export`` writes);
    ``{"params"|"params_ema"|"model"|"net"|"state_dict": state_dict}`` (``key`` picks
    one explicitly, e.g. ``params_ema``); keys with a ``module.`` prefix; Lightning checkpoints of this project
    (backbone keys ``net.*``). With ``strict`` every difference raises ``WeightLoadError`` listing missing and
    unexpected keys and shape mismatches with a likely cause; without it only the matching tensors load.
    """
    state, name = _read(source, key)
    expected = model.state_dict()
    state = _strip_prefixes(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, tuple(expected[k].shape), tuple(v.shape)) for k, v in state.items()
                  if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if strict and (missing or unexpected or mismatched):
        lines = [f"checkpoint {name} does not fit {type(model).__name__}:"]
        if missing:
            more = " ..." if len(missing) > 10 else ""
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:10])}{more}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
        for k, want, got in mismatched[:10]:
            lines.append(f"  shape mismatch {k}: model {want}, checkpoint {got}")
        cause = _likely_cause([k for k, _, _ in mismatched], missing, unexpected)
        lines.append(f"  likely cause: {cause}")
        raise WeightLoadError("\n".join(lines))
    usable = {k: v for k, v in state.items() if k in expected and tuple(v.shape) == tuple(expected[k].shape)}
    model.load_state_dict(usable, strict=False)
    return model
