"""``torch.compile`` for the backbones, in training (``compile: true``) and inference (``kbnet-restore --compile``).

``nn.Module.compile`` compiles the module's forward in place, so the module keeps its class, its parameters and its
state-dict names: checkpoints of a compiled run load into an eager model and the reverse, and code that asks
``isinstance(model, KBNetS)`` still works. Until KBA is a registered operator the graph breaks at each native KBA
call (the kernels are a ctypes call); the rest of each block still compiles.
"""

from __future__ import annotations

from torch import nn


def compile_model(model: nn.Module) -> nn.Module:
    """Compile ``model``'s forward in place, for static shapes.

    Static, because the progressive patch/batch schedule changes the input shape a few times per run, and with
    dynamic shapes Inductor (torch 2.13) fails on the backbone ("cannot determine truth value of Relational"); each
    new shape compiles once (up to ``torch._dynamo.config.recompile_limit``, then that forward runs eagerly).
    """
    model.compile(dynamic=False)
    return model
