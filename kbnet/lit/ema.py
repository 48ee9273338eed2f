"""Exponential moving average of the backbone weights (off in the paper's recipe, ``module.ema_decay``)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from kbnet.errors import ConfigError


class EMA(nn.Module):
    """A frozen copy of the backbone that trails it: ``ema = decay * ema + (1 - decay) * weights`` after each step.

    It is a submodule so its weights travel in the checkpoint (keys ``ema.module.*``) and resume exactly; its
    parameters do not require gradients, so the optimizer and DDP leave them alone.
    """

    def __init__(self, net: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"module.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(net).requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in net.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for ema_buffer, buffer in zip(self.module.buffers(), net.buffers(), strict=True):
            ema_buffer.copy_(buffer)
