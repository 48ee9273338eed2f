"""The official KBA formulation (``KBAFunction`` of the official code), kept as the yardstick for tests and benchmarks.

It builds the fused kernel of every pixel as one tensor of B·H·W·C·(C/groups)·k² values, applies it to the unfolded
input with batched matrix-vector products, and (like the official custom backward) stores only its inputs and
recomputes the fused kernels in backward. Correct but memory-hungry; ``kbnet.ops.kba`` is the one to use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _unfold(x: torch.Tensor, kernel_size: int, groups: int) -> torch.Tensor:
    """Zero-padded k×k neighbourhoods as (B, HW, groups, C/groups·k²), channel-major like ``F.unfold``."""
    b, c, h, w = x.shape
    uf = F.unfold(x, kernel_size, padding=kernel_size // 2)
    return uf.reshape(b, groups, (c // groups) * kernel_size**2, h * w).permute(0, 3, 1, 2)


class _KBAReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, att, weight, bias, kernel_size: int, groups: int):  # type: ignore[override]
        b, c, h, w = x.shape
        a = att.reshape(b, att.shape[1], h * w).transpose(1, 2)
        attk = (a @ weight).reshape(b, h * w, groups, c // groups, -1)
        uf = _unfold(x, kernel_size, groups)
        out = (attk @ uf.unsqueeze(-1)).reshape(b, h * w, c) + a @ bias
        ctx.save_for_backward(x, att, weight, bias)
        ctx.kernel_size, ctx.groups = kernel_size, groups
        return out.transpose(1, 2).reshape(b, c, h, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, att, weight, bias = ctx.saved_tensors
        k, groups = ctx.kernel_size, ctx.groups
        b, c, h, w = x.shape
        gc = c // groups
        a = att.reshape(b, att.shape[1], h * w).transpose(1, 2)
        attk = (a @ weight).reshape(b, h * w, groups, gc, gc * k * k)
        uf = _unfold(x, k, groups)
        g = grad_out.reshape(b, c, h * w).transpose(1, 2)
        grad_bias = (a.transpose(1, 2) @ g).sum(0, keepdim=True)
        g_groups = g.reshape(b, h * w, groups, gc, 1)
        dattk = (g_groups * uf.unsqueeze(3)).reshape(b, h * w, -1)
        duf = (attk * g_groups).sum(3)
        grad_x = F.fold(duf.permute(0, 2, 3, 1).reshape(b, c * k * k, h * w), (h, w), k, padding=k // 2)
        grad_a = g @ bias[0].t() + dattk @ weight[0].t()
        grad_att = grad_a.transpose(1, 2).reshape_as(att)
        grad_weight = (a.transpose(1, 2) @ dattk).sum(0, keepdim=True)
        return grad_x, grad_att, grad_weight, grad_bias, None, None


def kba_reference(x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  kernel_size: int, groups: int) -> torch.Tensor:
    """Kernel basis attention, official unfold formulation (same signature and layouts as ``kbnet.ops.kba``)."""
    return _KBAReference.apply(x, att, weight, bias, kernel_size, groups)
