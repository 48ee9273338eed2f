"""Kernel basis attention (KBA), the pixel-adaptive operator of KBNet, and the choice of its implementation.

For every pixel p the ``nset`` learnable kernel bases ``W_n`` (grouped k×k convolutions) and bias bases ``b_n`` are
mixed by the predicted coefficients ``att[:, n, p]`` and the fused kernel is applied to the neighbourhood of p:

    out[:, :, p] = sum_n att[:, n, p] * (conv_{W_n}(x)[:, :, p] + b_n)

Layouts are the official ones: ``weight`` (1, nset, C·(C/groups)·k²), per basis out-channel major, then the
in-channel within the group, then kh, kw; ``bias`` (1, nset, C).

Four implementations compute the same maths (``IMPLEMENTATIONS``): the fused C++ kernels of ``kbnet.ops.native``
(CPU), the fused Triton kernels of ``kbnet.ops.kba_triton`` (CUDA), horizontal slabs of rows in plain PyTorch (any
device and dtype), and the official formulation (``kba_reference``, the yardstick). None of the first three ever
holds the B·H·W·C·(C/groups)·k² fused-kernel tensor the official code allocates, and all keep only their four inputs
for backward, recomputing the rest. They run as one registered operator, ``torch.ops.kbnet.kba`` (its backward as
``torch.ops.kbnet.kba_backward``), with fake implementations for ``torch.compile``/``torch.export``. Under
``torch.autocast`` every operand is cast consistently, which the official function cannot do. Double backward is
supported: the slab backward is written in differentiable operations on the saved inputs, so autograd records it
whenever a graph of the gradient is requested (``create_graph=True``), whichever implementation ran forward.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from kbnet.errors import UserError
from kbnet.ops import kba_triton, native
from kbnet.ops.autocast import autocast_dtype
from kbnet.ops.kba_decomposed import kba_decomposed
from kbnet.ops.kba_reference import kba_reference

SLAB_BYTES = 64 * 2**20
"""CPU budget for the transient per-slab tensors; small enough to stay in the last-level cache of large CPUs."""
CUDA_SLAB_FRACTION = 1 / 16
"""CUDA budget as a fraction of the device's memory: on a GPU every slab costs a dozen kernel launches, so the
fewer slabs the better, while a sixteenth of the device still leaves the network its activations."""
SLAB_ENV = "KBNET_KBA_SLAB_MB"


def slab_budget(device: torch.device) -> int:
    """Bytes the PyTorch implementation may spend on the transient tensors of one slab on ``device``:
    ``$KBNET_KBA_SLAB_MB`` (MiB) on any device, else a fraction of a CUDA device's memory, else ``SLAB_BYTES``."""
    value = os.environ.get(SLAB_ENV)
    if value is not None:
        try:
            mib = float(value)
        except ValueError:
            mib = -1.0
        if not mib > 0:
            raise UserError(f"environment variable {SLAB_ENV}={value!r}: expected a positive number of MiB")
        return int(mib * 2**20)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * CUDA_SLAB_FRACTION)
    return SLAB_BYTES


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
    return max(1, slab_budget(x.device) // max(per_row, 1))


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


def run_forward(x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel_size: int,
                groups: int, impl: str) -> torch.Tensor:
    """The forward of one concrete implementation (``native``, ``torch`` or ``triton``) on plain tensors."""
    if impl == "native":
        return native.forward(x, att, weight, bias, kernel_size, groups)
    if impl == "triton":
        return kba_triton.forward(x, att, weight, bias, kernel_size, groups)
    if impl == "torch":
        return _forward(x, att, weight, bias, kernel_size, groups)
    raise ValueError(f"kbnet::kba runs the native, triton and torch implementations, not {impl!r}")


def run_backward(x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 grad_out: torch.Tensor, kernel_size: int, groups: int,
                 impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of x, att, weight and bias of one concrete implementation."""
    if impl == "native":
        return native.backward(x, att, weight, bias, grad_out, kernel_size, groups)
    if impl == "triton":
        return kba_triton.backward(x, att, weight, bias, grad_out, kernel_size, groups)
    if impl == "torch":
        grad_x, *rest = _backward(x, att, weight, bias, grad_out.contiguous(), kernel_size, groups)
        return (grad_x.contiguous(), *rest)
    raise ValueError(f"kbnet::kba_backward runs the native, triton and torch implementations, not {impl!r}")


def _result_format(t: torch.Tensor, impl: str) -> torch.memory_format:
    """The native kernels keep a channels-last input channels-last; the other implementations return contiguous."""
    return native._memory_format(t) if impl == "native" else torch.contiguous_format


@torch.library.custom_op("kbnet::kba", mutates_args=())
def _kba_op(x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel_size: int,
            groups: int, impl: str) -> torch.Tensor:
    return run_forward(x, att, weight, bias, kernel_size, groups, impl)


@_kba_op.register_fake
def _kba_fake(x, att, weight, bias, kernel_size, groups, impl):
    return torch.empty_like(x, memory_format=_result_format(x, impl))


@torch.library.custom_op("kbnet::kba_backward", mutates_args=())
def _kba_backward_op(x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     grad_out: torch.Tensor, kernel_size: int, groups: int,
                     impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_backward(x, att, weight, bias, grad_out, kernel_size, groups, impl)


@_kba_backward_op.register_fake
def _kba_backward_fake(x, att, weight, bias, grad_out, kernel_size, groups, impl):
    return (torch.empty_like(x, memory_format=_result_format(x, impl)),
            torch.empty_like(att, memory_format=_result_format(att, impl)),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(bias, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output) -> None:
    x, att, weight, bias, kernel_size, groups, impl = inputs
    ctx.save_for_backward(x, att, weight, bias)
    ctx.kernel_size, ctx.groups, ctx.impl = kernel_size, groups, impl


def _kba_grad(ctx, grad_out):
    """Gradients of the four tensors. The slab backward is written in differentiable operations, so it also serves
    a gradient of the gradient (``create_graph=True``) of the fused kernels, whose backward is not differentiable."""
    x, att, weight, bias = ctx.saved_tensors
    if ctx.impl == "torch" or torch.is_grad_enabled():
        grads = _backward(x, att, weight, bias, grad_out.contiguous(), ctx.kernel_size, ctx.groups)
    else:
        grads = torch.ops.kbnet.kba_backward(x, att, weight, bias, grad_out, ctx.kernel_size, ctx.groups, ctx.impl)
    return (*grads, None, None, None)


_kba_op.register_autograd(_kba_grad, setup_context=_setup_context)

IMPLEMENTATIONS = ("auto", "native", "torch", "triton", "reference", "decomposed")
"""``native``: fused C++ kernels (CPU, float32/float64, 1/2/4/8 channels per group, and bfloat16 with 2/4/8 where
the CPU has AVX512_BF16); ``torch``: row slabs in plain PyTorch (any device and dtype); ``triton``: fused Triton
kernels (CUDA; CPU tensors only in Triton's interpreter, ``TRITON_INTERPRET=1``); ``reference``: the official
formulation; ``decomposed``: standard ATen operators only (``kbnet.ops.kba_decomposed``), what exports to ONNX and
to a ``torch.export`` program without kbnet code; ``auto``: native on CPU and Triton on CUDA where they apply, else
torch."""

_ENV = "KBNET_KBA"
_current: ContextVar[str | None] = ContextVar("kbnet_kba_impl", default=None)
_warned_native = False
_warned_fallbacks: set[str] = set()


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


def _warn_once(message: str) -> None:
    if message not in _warned_fallbacks:
        _warned_fallbacks.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


@torch.compiler.assume_constant_result
def _requested(impl: str | None) -> str:
    """``impl`` checked, or the default; a constant for ``torch.compile``, which cannot trace a context variable."""
    return _validate(impl, "kba") if impl is not None else default_impl()


@torch.compiler.assume_constant_result
def _resolve(impl: str, device: str, dtype: torch.dtype, channels: int, nset: int, groups: int,
             kernel_size: int) -> str:
    """The concrete implementation of a call on ``device`` with operands of ``dtype``. Plain values only, so that
    ``torch.compile`` runs it once while tracing (it looks up the native library and triton, which dynamo cannot
    trace) and puts the result into the graph."""
    global _warned_native
    native_ok = device == "cpu" and native.supports(torch.empty(0, channels, 0, 0, dtype=dtype), groups)
    if impl == "native":
        if not native_ok:
            raise ValueError(f"kba: the native implementation needs a CPU tensor of dtype {native.native_dtypes()} "
                             f"(bf16/fp16 under autocast) and {native.GROUP_CHANNELS} channels per group "
                             f"({native.BF16_GROUP_CHANNELS} in bfloat16); got a "
                             f"{device} {dtype} tensor with {channels // groups} channels per group")
        if not native.available():
            raise RuntimeError(f"kba: the native implementation is unavailable: {native.unavailable_reason()}")
        return impl
    if impl == "triton":
        reason = kba_triton.unsupported_reason(device, dtype, channels, nset, groups, kernel_size)
        if reason is not None:
            raise ValueError(f"kba: the triton implementation cannot run this call: {reason}")
        return impl
    if impl != "auto":
        return impl
    if device == "cuda":
        reason = kba_triton.unsupported_reason(device, dtype, channels, nset, groups, kernel_size)
        if reason is None:
            return "triton"
        _warn_once(f"kba: using the slower PyTorch implementation on CUDA: {reason}")
        return "torch"
    if not native_ok:
        return "torch"
    if native.available():
        return "native"
    if not _warned_native:
        warnings.warn(f"kba: using the slower PyTorch implementation, the native kernels are unavailable: "
                      f"{native.unavailable_reason()}", RuntimeWarning, stacklevel=4)
        _warned_native = True
    return "torch"


@torch.compiler.assume_constant_result
def _autocast_compute(impl: str, device: str, dtype: torch.dtype, channels: int, groups: int) -> torch.dtype:
    """The dtype a call computes in under autocast to ``dtype``: the native kernels' (``native.compute_dtype``:
    bfloat16 where the CPU has AVX512_BF16, else float32) where they may run it, else ``dtype`` itself. A constant
    for ``torch.compile``, which cannot trace the look-up of the native library's instruction sets."""
    if impl in ("auto", "native") and device == "cpu":
        native_compute = native.compute_dtype(dtype)
        if native.supports(torch.empty(0, channels, 0, 0, dtype=native_compute), groups):
            return native_compute
    return dtype


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

    Every implementation but ``reference`` runs as the registered operator ``torch.ops.kbnet.kba`` (with its fake
    implementation and autograd formula), so ``torch.compile`` and ``torch.export`` see one node per call; the
    implementation is resolved here, in Python, and passed to the operator as an argument. Under ``torch.compile``
    it is resolved once, when the call is traced: a later ``use_kba`` does not change a compiled model.

    Under ``torch.autocast`` the result has the autocast dtype; the native kernels compute it in
    ``native.compute_dtype`` of it (bfloat16 with float32 sums where the CPU has AVX512_BF16, else float32), the
    others in the autocast dtype (Triton accumulates in float32).
    """
    _check(x, att, weight, bias, kernel_size, groups)
    impl = _requested(impl)
    device = x.device.type
    autocast = autocast_dtype(x)
    if autocast is not None:
        dtype = autocast
        compute = _autocast_compute(impl, device, dtype, x.shape[1], groups)
    else:
        dtype = compute = torch.promote_types(torch.promote_types(x.dtype, att.dtype),
                                              torch.promote_types(weight.dtype, bias.dtype))
    with torch.autocast(device, enabled=False) if autocast is not None else nullcontext():
        chosen = _resolve(impl, device, compute, x.shape[1], att.shape[1], groups, kernel_size)
        # The native bf16 kernels take the bases in their own dtype: rounded inside, gradients summed in float32.
        bases = chosen == "native" and compute == torch.bfloat16
        operands = (x.to(compute), att.to(compute), weight if bases else weight.to(compute),
                    bias if bases else bias.to(compute))
        if chosen == "reference":
            out = kba_reference(*operands, kernel_size, groups)
        elif chosen == "decomposed":
            out = kba_decomposed(*operands, kernel_size, groups)
        else:
            out = torch.ops.kbnet.kba(*operands, kernel_size, groups, chosen)
    return out.to(dtype)
