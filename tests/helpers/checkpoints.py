"""Helpers shared by the inference, restore and evaluation tests (this module holds no tests itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kbnet.models import create_model


def tiny_model(name: str = "kbnet_s_tiny", seed: int = 0, **overrides: Any) -> nn.Module:
    """A small preset with deterministic random weights, in eval mode."""
    torch.manual_seed(seed)
    return create_model(name, **overrides).eval()


def save_project_checkpoint(path: Path, name: str = "kbnet_s_tiny", seed: int = 0, ema_seed: int | None = None,
                            **overrides: Any) -> nn.Module:
    """A checkpoint laid out like this project's Lightning checkpoints (``net.*`` keys, ``net_config``).

    With ``ema_seed`` the file also holds an EMA copy (``ema.module.*``) with other weights; returns the ``net``
    backbone.
    """
    net = tiny_model(name, seed, **overrides)
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    if ema_seed is not None:
        ema = tiny_model(name, ema_seed, **overrides)
        state.update({f"ema.module.{k}": v for k, v in ema.state_dict().items()})
    net_config = {"_target_": "kbnet.models.create_model", "name": name, **overrides}
    torch.save({"state_dict": state, "hyper_parameters": {"net_config": net_config, "seed": 100},
                "global_step": 4, "pytorch-lightning_version": "2.6.6"}, path)
    return net


def save_official_checkpoint(path: Path, name: str = "kbnet_s_tiny", wrapper: str | None = "params",
                             data_parallel: bool = False, seed: int = 0) -> nn.Module:
    """Weights saved the way the official releases are: optionally wrapped and ``module.``-prefixed."""
    net = tiny_model(name, seed)
    state = {("module." if data_parallel else "") + k: v for k, v in net.state_dict().items()}
    torch.save(state if wrapper is None else {wrapper: state}, path)
    return net


def outputs_equal(a: nn.Module, b: nn.Module, channels: int = 3) -> bool:
    x = torch.rand(1, channels, 24, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return torch.equal(a(x), b(x))
