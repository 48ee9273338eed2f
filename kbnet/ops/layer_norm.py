"""The LayerNorm over the channels of a channels-last (B, C, H, W) map: bf16 maps on the CPU's native kernels.

Why: under bf16 autocast a LayerNorm2d gets bf16 maps. PyTorch's CPU LayerNorm of a bf16 map with float32
parameters sums the weight and bias gradients in bf16 (5 % off over a 64² map), so training had to cast every map
to float32 and the result back, three passes more in each direction. The native kernels (``layer_norm_cpu.cpp``)
read and write bf16 and compute in float32: one pass forward, one backward, the parameter gradients summed in
float32. They have a float32 version too, which ``kbnet-bench layer_norm`` times against PyTorch's: no faster at
the small levels (the registered operator's dispatch), so float32 maps stay on ``F.layer_norm`` of the same
contiguous (B, H, W, C) view, as do CUDA, float64, ``torch.export`` traces and machines without a C++ compiler.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from kbnet.ops import native
from kbnet.ops.autocast import autocast_dtype

NATIVE_DTYPES = (torch.float32, torch.bfloat16)
"""The dtypes the kernels handle (``native_kernels=True``)."""
AUTO_DTYPES = (torch.bfloat16,)
"""The dtypes ``channel_layer_norm`` gives the kernels by default."""


def supports(x: torch.Tensor) -> bool:
    """Whether the native kernels can normalise ``x``: a channels-last CPU map of ``NATIVE_DTYPES``, outside an
    export (an exported graph must run without kbnet)."""
    return (x.device.type == "cpu" and x.dtype in NATIVE_DTYPES and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last) and not torch.compiler.is_exporting()
            and _native_available())


@torch.compiler.assume_constant_result
def _native_available() -> bool:
    """``native.available()``, which ``torch.compile`` runs once while tracing (it looks up the built library)."""
    return native.available()


def channel_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       native_kernels: bool | None = None) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) · weight + bias`` over the channels of each pixel of a channels-last map (the
    biased variance, as in the official code), channels-last, in the dtype of ``x`` (float32 when PyTorch's
    LayerNorm trains under autocast). ``native_kernels``: None runs the kernels for ``AUTO_DTYPES`` where
    ``supports(x)``, True always (a ``ValueError`` where they cannot read ``x``), False never (the benchmark's
    baseline)."""
    if native_kernels is None:
        native_kernels = x.dtype in AUTO_DTYPES and supports(x)
    if native_kernels:
        return torch.ops.kbnet.channel_layer_norm(x, weight.float(), bias.float(), eps)[0]
    low = autocast_dtype(x) is not None
    with torch.autocast(x.device.type, enabled=False) if low else nullcontext():
        if low and torch.is_grad_enabled():
            # PyTorch's mixed-dtype backward sums the weight and bias gradients in low precision (see above).
            x = x.float()
        # Else a bf16 map with float32 parameters: statistics in float32 inside one kernel, no copy.
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps)
    return y.permute(0, 3, 1, 2)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[1])


@torch.library.custom_op("kbnet::channel_layer_norm", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The normalised map, and each pixel's mean and 1/std (float32) for the backward.

    A registered operator, so torch.compile, fake tensors and dispatch modes (the launch counts) see one operator.
    Its Python dispatch costs about 30 µs per call forward and 140 µs forward+backward: a few milliseconds per pass
    of a backbone, as much as the kernels themselves only at the 16² and 32² levels."""
    _check_operands(x, weight, bias)
    y = torch.empty_like(x, memory_format=torch.channels_last)
    mean = torch.empty(_rows(x), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    getattr(native._lib(), f"layer_norm_forward_{native._suffix(x.dtype)}")(
        x.data_ptr(), weight.contiguous().data_ptr(), bias.contiguous().data_ptr(), y.data_ptr(), mean.data_ptr(),
        rstd.data_ptr(), _rows(x), x.shape[1], eps, native._copy_threads(x))
    return y, mean, rstd


def _check_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """The kernels read raw memory: anything else than what they expect is refused before they run."""
    if not supports(x):
        reason = native.unavailable_reason()
        raise ValueError(f"kbnet::channel_layer_norm needs a channels-last CPU map of {NATIVE_DTYPES}, outside an "
                         f"export{f', and the kernels, which are unavailable: {reason}' if reason else ''}; got a "
                         f"{x.device.type} {x.dtype} map of shape {tuple(x.shape)} and strides {x.stride()}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.device.type != "cpu" or t.dtype != torch.float32 or t.shape != (x.shape[1],):
            raise ValueError(f"kbnet::channel_layer_norm needs a float32 CPU {name} of shape ({x.shape[1]},); got "
                             f"{t.device.type} {t.dtype} {tuple(t.shape)}")


@_forward_op.register_fake
def _forward_fake(x, weight, bias, eps):
    mean = x.new_empty(_rows(x), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.channels_last), mean, torch.empty_like(mean)


@torch.library.custom_op("kbnet::channel_layer_norm_backward", mutates_args=())
def _backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of the map (its dtype, channels-last) and of the weight and bias (float32)."""
    grad_y = grad_y.to(x.dtype).contiguous(memory_format=torch.channels_last)
    grad_x = torch.empty_like(x, memory_format=torch.channels_last)
    grad_weight = torch.empty(x.shape[1], dtype=torch.float32)
    grad_bias = torch.empty_like(grad_weight)
    getattr(native._lib(), f"layer_norm_backward_{native._suffix(x.dtype)}")(
        grad_y.data_ptr(), x.data_ptr(), weight.contiguous().data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        grad_x.data_ptr(), grad_weight.data_ptr(), grad_bias.data_ptr(), _rows(x), x.shape[1], native._copy_threads(x))
    return grad_x, grad_weight, grad_bias


@_backward_op.register_fake
def _backward_fake(grad_y, x, weight, mean, rstd):
    grad_weight = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.channels_last), grad_weight, torch.empty_like(grad_weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.eps = eps


def _grad(ctx, grad_y, grad_mean, grad_rstd):
    """Gradients of (x, weight, bias, eps): the native backward, or differentiable operations where a gradient of
    the gradient is asked for (``create_graph=True``)."""
    x, weight, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        return (*_differentiable_grads(grad_y, x, weight, ctx.eps), None)
    return (*torch.ops.kbnet.channel_layer_norm_backward(grad_y, x, weight, mean, rstd), None)


def _differentiable_grads(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The native backward's gradients in differentiable float32 operations (the native backward is not)."""
    xf = x.float().permute(0, 2, 3, 1)
    mu = xf.mean(-1, keepdim=True)
    rs = torch.rsqrt((xf - mu).pow(2).mean(-1, keepdim=True) + eps)
    xhat = (xf - mu) * rs
    g = grad_y.float().permute(0, 2, 3, 1)
    gw = g * weight
    grad_x = rs * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
    return grad_x.permute(0, 3, 1, 2).to(x.dtype), (g * xhat).sum((0, 1, 2)), g.sum((0, 1, 2))


_forward_op.register_autograd(_grad, setup_context=_setup_context)
