"""Kernel basis attention (KBA), the pixel-adaptive operator of KBNet, and the choice of its implementation.

For every pixel p the ``nset`` learnable kernel bases ``W_n`` (grouped k×k convolutions) and bias bases ``b_n`` are
mixed by the predicted coefficients ``att[:, n, p]`` and the fused kernel is applied to the neighbourhood of p:

    out[:, :, p] = sum_n att[:, n, p] * (conv_{W_n}(x)[:, :, p] + b_n)

Layouts are the official ones: ``weight`` (1, nset, C·(C/groups)·k²), per basis out-channel major, then the
in-channel within the group, then kh, kw; ``bias`` (1, nset, C).

Three implementations compute the same maths (``IMPLEMENTATIONS``): the fused C++ kernels of ``kbnet.ops.native``
(CPU), horizontal slabs of rows in plain PyTorch (any device and dtype), and the official formulation
(``kba_reference``, the yardstick). Neither of the first two ever holds the B·H·W·C·(C/groups)·k² fused-kernel
tensor the official code allocates, and both keep only their four inputs for backward, recomputing the rest. Under
``torch.autocast`` every operand is cast consistently, which the official function cannot do. Double backward is
supported: the slab backward is written in differentiable operations on the saved inputs, so autograd records it
whenever a graph of the gradient is requested (``create_graph=True``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from kbnet.ops import native
from kbnet.ops.kba_decomposed import kba_decomposed
from kbnet.ops.kba_reference import kba_reference

SLAB_BYTES = 64 * 2**20
"""Budget for the transient per-slab tensors; small enough to stay in the last-level cache of large CPUs."""


def _check(x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel_size: int,
           groups: int) -> None:
    if x.dim() != 4 or att.dim() != 4:
        raise ValueError(f"kba expects x (B, C, H, W) and att (B, nset, H, W), got {tuple(x.shape)} and "
                         f"{tuple(att.shape)}")
    b, c = x.shape[:2]
    nset = att.shape[1]
    if att.shape[0] != b or att.shape[2:] != x.shape[2:]:
        raise ValueError(f"kba: att {tuple(att.shape)} does not match x {tuple(x.shape)} in batch or size")
    if kernel_size % 2 != 1:
        raise ValueError(f"kba: kernel_size must be odd, got {kernel_size}")
    if c % groups:
        raise ValueError(f"kba: channels {c} not divisible by groups {groups}")
    expected_w = (1, nset, c * (c // groups) * kernel_size**2)
    if tuple(weight.shape) != expected_w:
        raise ValueError(f"kba: weight has shape {tuple(weight.shape)}, expected {expected_w}")
    if tuple(bias.shape) != (1, nset, c):
        raise ValueError(f"kba: bias has shape {tuple(bias.shape)}, expected {(1, nset, c)}")


def _slab_rows(x: torch.Tensor, weight: torch.Tensor) -> int:
    b, _, _, w = x.shape
    per_row = b * w * weight.shape[-1] * x.element_size() * 3
    return max(1, SLAB_BYTES // max(per_row, 1))


def _slabs(h: int, rows: int) -> list[tuple[int, int]]:
    return [(r0, min(r0 + rows, h)) for r0 in range(0, h, rows)]


def _unfold_slab(xp: torch.Tensor, r0: int, r1: int, k: int, groups: int) -> torch.Tensor:
    """Neighbourhoods of rows [r0, r1) of the zero-padded input as (B, P, groups, C/groups·k²)."""
    b, c = xp.shape[:2]
    uf = F.unfold(xp[:, :, r0:r1 + k - 1], k)
    return uf.reshape(b, groups, (c // groups) * k * k, -1).permute(0, 3, 1, 2)


def _coefficients(att: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Fusion coefficients of rows [r0, r1) as (B, P, nset)."""
    b, n = att.shape[:2]
    return att[:, :, r0:r1].reshape(b, n, -1).transpose(1, 2)


def _forward(x, att, weight, bias, k, groups):
    b, c, h, w = x.shape
    gc = c // groups
    xp = F.pad(x, (k // 2,) * 4)
    out = x.new_empty(b, h, w, c)
    for r0, r1 in _slabs(h, _slab_rows(x, weight)):
        a = _coefficients(att, r0, r1)
        kernels = (a @ weight).reshape(b, -1, groups, gc, gc * k * k)
        uf = _unfold_slab(xp, r0, r1, k, groups)
        y = (kernels @ uf.unsqueeze(-1)).reshape(b, -1, c) + a @ bias
        out[:, r0:r1] = y.reshape(b, r1 - r0, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def _backward(x, att, weight, bias, grad_out, k, groups):
    b, c, h, w = x.shape
    gc = c // groups
    p = k // 2
    xp = F.pad(x, (p,) * 4)
    grad_xp = torch.zeros_like(xp)
    grad_att = torch.empty_like(att)
    grad_weight = torch.zeros_like(weight)
    grad_bias = torch.zeros_like(bias)
    for r0, r1 in _slabs(h, _slab_rows(x, weight)):
        a = _coefficients(att, r0, r1)
        g = grad_out[:, :, r0:r1].reshape(b, c, -1).transpose(1, 2)
        g_groups = g.reshape(b, -1, groups, gc, 1)
        kernels = (a @ weight).reshape(b, -1, groups, gc, gc * k * k)
        uf = _unfold_slab(xp, r0, r1, k, groups)
        grad_kernels = (g_groups * uf.unsqueeze(3)).reshape(b, g.shape[1], -1)
        grad_uf = (kernels * g_groups).sum(3)
        grad_xp[:, :, r0:r1 + k - 1] += F.fold(grad_uf.permute(0, 2, 3, 1).reshape(b, c * k * k, -1),
                                               (r1 - r0 + k - 1, w + k - 1), k)
        grad_a = g @ bias[0].t() + grad_kernels @ weight[0].t()
        grad_att[:, :, r0:r1] = grad_a.transpose(1, 2).reshape(b, -1, r1 - r0, w)
        a_t = a.transpose(1, 2)
        grad_bias += (a_t @ g).sum(0, keepdim=True)
        grad_weight += (a_t @ grad_kernels).sum(0, keepdim=True)
    return grad_xp[:, :, p:p + h, p:p + w], grad_att, grad_weight, grad_bias


class _KBATorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, att, weight, bias, kernel_size: int, groups: int):  # type: ignore[override]
        ctx.save_for_backward(x, att, weight, bias)
        ctx.kernel_size, ctx.groups = kernel_size, groups
        return _forward(x, att, weight, bias, kernel_size, groups)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, att, weight, bias = ctx.saved_tensors
        grads = _backward(x, att, weight, bias, grad_out.contiguous(), ctx.kernel_size, ctx.groups)
        return (*grads, None, None)


class _KBANative(torch.autograd.Function):
    """The fused CPU kernels; a gradient of the gradient (``create_graph=True``) is recorded through the
    differentiable PyTorch backward instead, so double backward works here too."""

    @staticmethod
    def forward(ctx, x, att, weight, bias, kernel_size: int, groups: int):  # type: ignore[override]
        ctx.save_for_backward(x, att, weight, bias)
        ctx.kernel_size, ctx.groups = kernel_size, groups
        return native.forward(x, att, weight, bias, kernel_size, groups)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, att, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            grads = _backward(x, att, weight, bias, grad_out.contiguous(), ctx.kernel_size, ctx.groups)
        else:
            grads = native.backward(x, att, weight, bias, grad_out, ctx.kernel_size, ctx.groups)
        return (*grads, None, None)


IMPLEMENTATIONS = ("auto", "native", "torch", "reference", "decomposed")
"""``native``: fused C++ kernels (CPU, float32/float64, 1/2/4/8 channels per group); ``torch``: row slabs in plain
PyTorch (any device and dtype); ``reference``: the official formulation; ``decomposed``: standard ATen operators
only (``kbnet.ops.kba_decomposed``), what exports to ONNX / torch.export; ``auto``: native where it applies, else
torch."""

_ENV = "KBNET_KBA"
_current: ContextVar[str | None] = ContextVar("kbnet_kba_impl", default=None)
_warned_native = False


def _validate(impl: str, origin: str) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"{origin}: unknown KBA implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
    return impl


def default_impl() -> str:
    """The implementation ``kba`` uses when none is given: ``use_kba``'s, else ``$KBNET_KBA``, else ``auto``."""
    current = _current.get()
    if current is not None:
        return current
    return _validate(os.environ.get(_ENV, "auto"), f"environment variable {_ENV}")


@contextmanager
def use_kba(impl: str) -> Iterator[None]:
    """Run every ``kba`` call without an explicit implementation inside the block with ``impl``.

    E.g. ``with use_kba("reference"): model(x)`` runs a whole network on the official formulation.
    """
    token = _current.set(_validate(impl, "use_kba"))
    try:
        yield
    finally:
        _current.reset(token)


def _resolve(impl: str, x: torch.Tensor, groups: int) -> str:
    global _warned_native
    if impl == "native":
        if not native.supports(x, groups):
            raise ValueError(f"kba: the native implementation needs a CPU tensor of dtype float32/float64 (bf16/fp16 "
                             f"under autocast) and {native.GROUP_CHANNELS} channels per group; got a "
                             f"{x.device.type} {x.dtype} tensor with {x.shape[1] // groups} channels per group")
        if not native.available():
            raise RuntimeError(f"kba: the native implementation is unavailable: {native.unavailable_reason()}")
        return impl
    if impl != "auto":
        return impl
    if not native.supports(x, groups):
        return "torch"
    if native.available():
        return "native"
    if not _warned_native:
        warnings.warn(f"kba: using the slower PyTorch implementation, the native kernels are unavailable: "
                      f"{native.unavailable_reason()}", RuntimeWarning, stacklevel=3)
        _warned_native = True
    return "torch"


def kba(x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel_size: int,
        groups: int, impl: str | None = None) -> torch.Tensor:
    """Kernel basis attention.

    Args:
        x: features the fused kernels are applied to, (B, C, H, W).
        att: per-pixel fusion coefficients, (B, nset, H, W); used as they are (no softmax), as in the official code.
        weight: kernel bases, (1, nset, C·(C/groups)·k²), official layout.
        bias: bias bases, (1, nset, C).
        kernel_size: k, odd; zero padding k//2 keeps the size.
        groups: number of channel groups of the grouped kernels.
        impl: one of ``IMPLEMENTATIONS``; ``None`` uses ``default_impl()``.

    Under ``torch.autocast`` the result has the autocast dtype; the native kernels compute it in float32, the others
    in the autocast dtype.
    """
    _check(x, att, weight, bias, kernel_size, groups)
    impl = _validate(impl, "kba") if impl is not None else default_impl()
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    if autocast:
        dtype = torch.get_autocast_dtype(device)
        compute = torch.float32 if impl in ("auto", "native") and native.supports(x, groups, torch.float32) else dtype
    else:
        dtype = compute = torch.promote_types(torch.promote_types(x.dtype, att.dtype),
                                              torch.promote_types(weight.dtype, bias.dtype))
    operands = (x.to(compute), att.to(compute), weight.to(compute), bias.to(compute))
    with torch.autocast(device, enabled=False) if autocast else nullcontext():
        chosen = _resolve(impl, operands[0], groups)
        if chosen == "reference":
            out = kba_reference(*operands, kernel_size, groups)
        elif chosen == "decomposed":
            out = kba_decomposed(*operands, kernel_size, groups)
        else:
            function = _KBANative if chosen == "native" else _KBATorch
            out = function.apply(*operands, kernel_size, groups)
    return out.to(dtype)
