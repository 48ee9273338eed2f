"""Build a ready-to-run backbone from a checkpoint: this project's Lightning checkpoints or official release files.

A Lightning checkpoint of this project carries the resolved model config (``hyper_parameters["net_config"]``), so
it alone rebuilds the backbone; so does a ``.safetensors`` file written by ``kbnet-export`` (its metadata holds the
config), and an exported ``.onnx`` file runs through onnxruntime (``OnnxModel``). An official release file holds
bare weights, so the caller names the preset
(``--model kbnet_l`` / ``model=kbnet_l``); a file for another preset fails with the ``WeightLoadError`` of
``kbnet.models.load_weights``, which lists the tensors that do not fit and the likely cause.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from kbnet.inference.onnx_model import ONNX_SUFFIX, OnnxModel, OnnxModelError, providers_for
from kbnet.models import WeightLoadError, create_model, list_models, load_weights, read_checkpoint
from kbnet.models.weights import SAFETENSORS_SUFFIX, safetensors_metadata

CREATE_MODEL = "kbnet.models.create_model"
EMA_PREFIX = "ema.module."
"""Where our LightningModules keep the EMA copy of the backbone (``module.ema_decay``)."""
PROJECT_WEIGHTS = ("auto", "ema", "net")


@dataclass
class LoadedModel:
    """A backbone in eval mode, the preset it was built as, where its weights came from, and the config that
    rebuilds it (``hydra.utils.instantiate``; ``None`` for an ONNX model)."""

    model: nn.Module
    name: str
    source: str
    config: dict[str, Any] | None = None


def _hyper_parameters(content: Any) -> Mapping[str, Any]:
    """The ``hyper_parameters`` of a Lightning checkpoint; empty for anything else."""
    hparams = content.get("hyper_parameters") if isinstance(content, Mapping) else None
    return hparams if isinstance(hparams, Mapping) else {}


def net_config_of(content: Any) -> dict[str, Any] | None:
    """The saved model config of one of our Lightning checkpoints, ``None`` for anything else."""
    config = _hyper_parameters(content).get("net_config")
    return dict(config) if isinstance(config, Mapping) else None


def task_of(content: Any) -> str | None:
    """The task one of our checkpoints was trained for (``None`` for older checkpoints and anything else)."""
    task = _hyper_parameters(content).get("task_name")
    return None if task is None else str(task)


def _project_state(content: Mapping, path: Path, weights: str) -> tuple[Mapping[str, torch.Tensor] | Path, str]:
    """The weights to load from our checkpoint: the EMA copy (if asked, or by default when there is one) or ``net``."""
    if weights not in PROJECT_WEIGHTS:
        raise WeightLoadError(f"{path} is a checkpoint of this project: weights must be one of "
                              f"{', '.join(PROJECT_WEIGHTS)}, got {weights!r}")
    state = content.get("state_dict")
    if not isinstance(state, Mapping):
        raise WeightLoadError(f"{path}: a Lightning checkpoint without a state_dict")
    ema = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    if weights == "ema" and not ema:
        raise WeightLoadError(f"{path}: weights=ema asked, but the run kept no EMA (module.ema_decay was null)")
    if ema and weights != "net":
        return ema, "EMA weights"
    return path, "weights"


def _rebuild(path: Path, config: dict[str, Any], name: str, expect_name: str | None, source: str) -> nn.Module:
    """The model a file's stored config describes; a preset the user named that differs from it is refused."""
    if expect_name is not None and expect_name != name:
        raise WeightLoadError(f"{path} holds a {name!r} model, not {expect_name!r}: leave the model choice out "
                              "(the file rebuilds its own) or pass the matching preset")
    try:
        return instantiate(config)
    except Exception as err:
        raise WeightLoadError(f"{path}: cannot rebuild the model from {source} {config}: {err}") from err


def model_from_checkpoint(path: str | Path, content: Any = None, weights: str = "auto",
                          expect_name: str | None = None) -> LoadedModel:
    """Rebuild the backbone of one of our Lightning checkpoints from its saved config and load its weights."""
    path = Path(path)
    content = read_checkpoint(path) if content is None else content
    config = net_config_of(content)
    if config is None:
        raise WeightLoadError(f"{path} is not a checkpoint of this project (no hyper_parameters.net_config)")
    name = str(config.get("name", config.get("_target_", "?")))
    model = _rebuild(path, config, name, expect_name, "hyper_parameters.net_config")
    state, what = _project_state(content, path, weights)
    load_weights(model, state)
    return LoadedModel(model.eval(), name, f"{path} ({name}, {what} of a project checkpoint)", config)


def model_from_official(path: str | Path, model: nn.Module, name: str, key: str | None = None,
                        config: dict[str, Any] | None = None) -> LoadedModel:
    """Load an official release file (or any bare state dict) into ``model``, built as preset ``name``
    (``config``: what built it; default the preset itself)."""
    load_weights(model, path, key=key)
    config = {"_target_": CREATE_MODEL, "name": name} if config is None else config
    return LoadedModel(model.eval(), name, f"{path} ({name}, official weights)", config)


def model_from_safetensors(path: str | Path, preset: str | None = None) -> LoadedModel:
    """A ``.safetensors`` file: rebuilt from the config ``kbnet-export`` stored in it, or (bare official-format
    weights) built as ``preset``; a ``preset`` that differs from the stored one is refused."""
    path = Path(path)
    metadata = safetensors_metadata(path)
    stored = metadata.get("kbnet.config")
    if stored is None:
        if preset is None:
            raise WeightLoadError(f"{path} has no kbnet metadata (not written by kbnet-export); name its preset with "
                                  f"--model (one of {', '.join(list_models())})")
        return model_from_official(path, create_model(preset), preset)
    config = json.loads(stored)
    name = str(config.get("name", metadata.get("kbnet.preset", "?")))
    model = _rebuild(path, config, name, preset, "its kbnet.config")
    load_weights(model, path)
    return LoadedModel(model.eval(), name, f"{path} ({name}, safetensors)", config)


def model_from_onnx(path: str | Path, preset: str | None = None, device: str = "cpu",
                    channels: int | None = None) -> LoadedModel:
    """An exported ONNX model on onnxruntime; ``preset`` and ``channels``, when given, must match the file."""
    path = Path(path)
    model = OnnxModel.load(path, providers_for(device))
    if preset is not None and model.preset is not None and preset != model.preset:
        raise OnnxModelError(f"{path} is an export of {model.preset!r}, not {preset!r}: leave the model choice out "
                             "or pass the matching preset")
    if channels is not None and model.channels != channels:
        raise OnnxModelError(f"{path} takes {model.channels}-channel images, but {channels} were expected (another "
                             "model's export?)")
    name = model.preset or path.stem
    return LoadedModel(model, name, f"{path} ({name}, ONNX on {model.providers[0]})", model.config)


def load_model(path: str | Path, preset: str | None = None, weights: str | None = None) -> LoadedModel:
    """Model for the restore CLI: our checkpoint (``preset`` optional, checked), an exported ``.safetensors`` or
    ``.onnx`` file (CPU onnxruntime; ``preset`` optional, checked) or an official file (``preset`` required).
    ``weights`` picks ``ema``/``net`` in our checkpoints and the wrapper key in official files."""
    path = Path(path)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return model_from_safetensors(path, preset)
    if path.suffix.lower() == ONNX_SUFFIX:
        return model_from_onnx(path, preset)
    content = read_checkpoint(path)
    if net_config_of(content) is not None:
        return model_from_checkpoint(path, content, weights or "auto", expect_name=preset)
    if preset is None:
        raise WeightLoadError(f"{path} is not a checkpoint of this project (it has no hyper_parameters.net_config); "
                              f"for an official release file name its preset with --model (one of "
                              f"{', '.join(list_models())})")
    del content
    return model_from_official(path, create_model(preset), preset, key=weights)


def model_channels(model: nn.Module) -> int:
    """Image channels the backbone takes (its first convolution's input channels)."""
    if isinstance(model, OnnxModel):
        return model.channels
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ValueError(f"cannot tell the input channels of {type(model).__name__}: it has no Conv2d")


def model_size_multiple(model: nn.Module) -> int:
    """Side multiple the model runs at without internal padding: its ``size_multiple`` (the backbones and ONNX
    exports state theirs); 1 for a network without one, which takes any size as it is."""
    return getattr(model, "size_multiple", 1)
