"""Kernel launches of one training step, counted without a GPU.

On a GPU every ATen operator call that reaches a backend is one kernel launch (or none, for a view), so the ATen
calls of a step bound its launch overhead. ``count_training_step`` counts them with a ``TorchDispatchMode``, plus
the Triton kernels the KBA wrapper launches (in ``kba_triton.dry_run()``: counted, not issued). It runs on fake CPU
tensors (``FakeTensorMode``): the operator calls of a real CPU step (equal at batch 2, 16², tested; at batch 1, 8²
KBNet_l differs by 4 %, size-one dimensions), in seconds for the full models, without their memory. The meta device
would not do: there several operators (layer norm, for one) decompose into many. Only ``auto`` depends on the device
(native on CPU, Triton on CUDA), so pass a concrete implementation. The ``torch`` and ``triton`` implementations of
the ``kbnet::kba`` operator are counted by what they call (ATen operators and Triton launches); a native kernel call
counts as one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from kbnet.models import create_model
from kbnet.ops import kba_triton, kernel_basis


@dataclass(frozen=True)
class Launches:
    """ATen operator calls and Triton kernel launches of one measured computation."""

    aten: int
    triton: int

    @property
    def total(self) -> int:
        return self.aten + self.triton


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = args[-1] if args else None
        if func is torch.ops.kbnet.kba.default and impl != "native":
            with self:
                return kernel_basis.run_forward(*args, **kwargs)
        if func is torch.ops.kbnet.kba_backward.default and impl != "native":
            with self:
                return kernel_basis.run_backward(*args, **kwargs)
        if func.namespace != "prim":  # prim.device: a query of fake tensors, no kernel
            self.calls += 1
        return func(*args, **kwargs)


def count(fn) -> Launches:
    """Launches of ``fn()``."""
    before = sum(kba_triton.launches.values())
    with _Counter() as counter:
        fn()
    return Launches(counter.calls, sum(kba_triton.launches.values()) - before)


def count_training_step(model: str, impl: str, batch: int, size: int, channels: int = 3) -> Launches:
    """Launches of one training step (forward, L1 loss, backward) of the preset ``model`` with KBA implementation
    ``impl`` on a ``batch`` of ``size``² images, on fake CPU tensors (no memory, no arithmetic)."""
    with FakeTensorMode(), kba_triton.dry_run():
        net = create_model(model).train()
        x = torch.rand(batch, channels, size, size)
        target = torch.rand(batch, channels, size, size)

        def step() -> None:
            with kernel_basis.use_kba(impl):
                F.l1_loss(net(x), target).backward()
        return count(step)
