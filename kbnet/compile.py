"""``torch.compile`` for the backbones, in training (``compile: true``) and inference (``kbnet-restore --compile``).

``nn.Module.compile`` compiles the module's forward in place, so the module keeps its class, its parameters and its
state-dict names: checkpoints of a compiled run load into an eager model and the reverse, and code that asks
``isinstance(model, KBNetS)`` still works. Until KBA is a registered operator the graph breaks at each native KBA
call (the kernels are a ctypes call); the rest of each block still compiles.
"""

from __future__ import annotations

from torch import nn


def compile_model(model: nn.Module) -> nn.Module:
    """Compile ``model``'s forward in place (dynamic shapes are detected after the second distinct size)."""
    model.compile()
    return model
