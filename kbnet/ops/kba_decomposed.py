"""KBA in standard ATen operators only, for deployment: torch.export, ONNX, onnxruntime, any backend.

The fast implementations of ``kbnet.ops.kba`` are a ctypes call (``native``) or a Python loop over row slabs whose
count depends on the image size (``torch``); neither becomes a graph with dynamic height and width. Here the same
maths is written without loops or custom kernels, so an exported graph holds only ``conv``/``mul``/``sum``:

    out[:, :, p] = sum_n att[:, n, p] * conv_{W_n}(x)[:, :, p] + (att[:, :, p] @ bias)

Two formulations are kept because their speed depends on the runtime:

* ``kba_grouped_conv``: all ``nset`` bases as ONE grouped convolution (``groups`` groups, ``nset·C/groups``
  outputs each) giving nset·C maps, then the per-pixel weighted sum over the bases, plus the bias bases as a 1×1
  convolution of ``att``;
* ``kba_unfold_matmul``: the k×k neighbourhoods unfolded once (C·k² rows per pixel), one batched matrix product
  with the bases per group, then the same weighted sum.

``kba_decomposed`` is the grouped convolution: under onnxruntime 1.32 (CPU, fp32, 2 threads) it was 1.7–2.8×
faster than unfold + matmul at the shape of every KBNet_s and KBNet_l level of a 256² input (``kbnet-bench
deploy --kba``), so it is the one the exporters receive. Both hold nset·C values per pixel transiently
(the price of having no fused kernel) and are differentiated by plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _conv_weight(weight: torch.Tensor, channels: int, groups: int, kernel_size: int) -> torch.Tensor:
    """The bases (1, nset, C·gc·k², official layout) as the weight of one grouped conv, (groups·nset·gc, gc, k, k):
    output channel order group, basis, channel within the group, so the conv's groups split them correctly."""
    nset = weight.shape[1]
    gc = channels // groups
    w = weight.reshape(nset, groups, gc, gc, kernel_size, kernel_size)
    return w.transpose(0, 1).reshape(groups * nset * gc, gc, kernel_size, kernel_size)


def _mix(y: torch.Tensor, att: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """``sum_n att[n] * y[g, n, o] + att @ bias`` for y (B, groups, nset, gc, H, W) -> (B, C, H, W)."""
    b, _, nset, gc, h, w = y.shape
    mixed = (y * att.reshape(b, 1, nset, 1, h, w)).sum(2).reshape(b, groups * gc, h, w)
    return mixed + F.conv2d(att, bias[0].t().reshape(groups * gc, nset, 1, 1))


def kba_grouped_conv(x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     kernel_size: int, groups: int) -> torch.Tensor:
    """KBA as one grouped convolution producing the nset·C basis responses, then their per-pixel weighted sum."""
    b, c, h, w = x.shape
    nset = att.shape[1]
    y = F.conv2d(x, _conv_weight(weight, c, groups, kernel_size), padding=kernel_size // 2, groups=groups)
    return _mix(y.reshape(b, groups, nset, c // groups, h, w), att, bias, groups)


def kba_unfold_matmul(x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      kernel_size: int, groups: int) -> torch.Tensor:
    """KBA as unfolded neighbourhoods times the bases (one batched matmul per group), then the weighted sum."""
    b, c, h, w = x.shape
    nset = att.shape[1]
    gc = c // groups
    uf = F.unfold(x, kernel_size, padding=kernel_size // 2).reshape(b, groups, gc * kernel_size**2, h * w)
    bases = _conv_weight(weight, c, groups, kernel_size).reshape(groups, nset * gc, gc * kernel_size**2)
    y = bases @ uf
    return _mix(y.reshape(b, groups, nset, gc, h, w), att, bias, groups)


def kba_decomposed(x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   kernel_size: int, groups: int) -> torch.Tensor:
    """Kernel basis attention for exported graphs (same signature and layouts as ``kbnet.ops.kba``)."""
    return kba_grouped_conv(x, att, weight, bias, kernel_size, groups)
