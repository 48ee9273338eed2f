"""Pixel losses selectable by name: the paper's L1 and the alternatives BasicSR defines (unused by KBNet)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kbnet.errors import ConfigError


class CharbonnierLoss(nn.Module):
    """sqrt((x - y)^2 + eps^2), averaged: a smooth L1 that many restoration papers train with."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((pred - target) ** 2 + self.eps**2).mean()


class PSNRLoss(nn.Module):
    """Negative per-image PSNR (data range 1), averaged over the batch; minimising it maximises the val metric."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mse = ((pred - target) ** 2).flatten(1).mean(dim=1)
        return (10 * torch.log10(mse + self.eps)).mean()


LOSSES: dict[str, Callable[[], nn.Module]] = {
    "l1": nn.L1Loss,
    "mse": nn.MSELoss,
    "charbonnier": CharbonnierLoss,
    "psnr": PSNRLoss,
}


def build_loss(name: str) -> nn.Module:
    """The loss registered under ``name`` (``module.loss`` in the config)."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r} (module.loss); available: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]()
