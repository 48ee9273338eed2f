"""Building blocks shared by both KBNet backbones."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kbnet.ops import kba
from kbnet.ops.autocast import autocast_dtype
from kbnet.ops.layer_norm import channel_layer_norm


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map, with the biased variance of the official code.

    The official code uses a hand-written autograd function for this; plain autograd computes the same gradients.
    A channels-last map is a contiguous (B, H, W, C) array, normalised in one fused pass (``channel_layer_norm``:
    the native kernels on the CPU, bf16 in and out under autocast) in place of seven element-wise passes.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_channels_last(x):
            return _autocast_output(channel_layer_norm(x, self.weight, self.bias, self.eps))
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + self.eps)
        return _autocast_output(self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1))


def _autocast_output(y: torch.Tensor) -> torch.Tensor:
    """A LayerNorm's result in the autocast dtype: autocast normalises in float32 (the statistics need it), and every
    consumer of the result is a convolution that would otherwise cast the same map down again, one copy each."""
    low = autocast_dtype(y)
    return y if low is None else y.to(low)


class GlobalAvgPool2d(nn.Module):
    """The mean of each channel over the whole map, (B, C, 1, 1): ``nn.AdaptiveAvgPool2d(1)`` of the official
    channel attention. On a channels-last map it sums the contiguous (B, H·W, C) view over H·W, one vectorised pass
    with float32 accumulation, where the CPU's pooling of a bf16 channels-last map is 6× slower."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_channels_last(x):
            return F.adaptive_avg_pool2d(x, 1)
        b, c, h, w = x.shape
        return (x.permute(0, 2, 3, 1).reshape(b, h * w, c).sum(1) / (h * w)).view(b, c, 1, 1)


def scaled_add(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x + y · scale`` for a learnable per-channel ``scale``, in the dtype of ``x`` and ``y``: under autocast a
    bf16 branch stays bf16 (a float32 parameter would promote it, and the next convolution cast it back), while a
    float32 residual stream plus a bf16 branch stays float32."""
    return torch.addcmul(x, y, scale.to(torch.promote_types(x.dtype, y.dtype)))


MERGED_GROUP_CHANNELS = 16
"""Input channels per group that oneDNN's bf16 (AMX) convolutions fill: they pad every group to this many."""


class GroupedConv2d(nn.Conv2d):
    """``nn.Conv2d`` for a few channels per group (KBNet_s's 5×5 spatial convolution, the 3×3 convolutions that
    predict the fusion coefficients), with the same parameters and results.

    oneDNN's bf16 convolutions on the CPU pad every group to 16 input and output channels, so with 2 or 4 per group
    most of the AMX work multiplies zeros and bf16 is no faster than float32. In bf16 on the CPU (bf16 input or
    autocast) ``m`` neighbouring groups therefore run as one group of 16 input channels with a block-diagonal
    weight: the same products plus exact zeros, 2-4× faster (``block_diagonal``).

    In the other dtypes (float32, float64) on the CPU a convolution with one output channel per group (the
    fusion-coefficient ones) runs as a depthwise convolution and a sum over each group's channels
    (``depthwise_then_sum``): the same products, which oneDNN's grouped kernels computed at 4-8 GFLOP/s on an AVX2
    CPU (``kbnet-bench grouped_conv``: 1.4-3.5× faster forward at all but one level of the backbones, 1.4-3.0×
    forward+backward). Everything else runs the plain grouped convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.padding_mode == "zeros":
            if x.dtype == torch.bfloat16 or autocast_dtype(x) == torch.bfloat16:
                merge = self._merge()
                if merge > 1:
                    return F.conv2d(x, block_diagonal(self.weight, self.groups, merge), self.bias, self.stride,
                                    self.padding, self.dilation, self.groups // merge)
            elif 1 < self.groups == self.out_channels < self.in_channels:
                return depthwise_then_sum(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return super().forward(x)

    def _merge(self) -> int:
        per_group = self.in_channels // self.groups
        if per_group >= MERGED_GROUP_CHANNELS or MERGED_GROUP_CHANNELS % per_group:
            return 1
        merge = MERGED_GROUP_CHANNELS // per_group
        return merge if self.groups % merge == 0 else 1


def block_diagonal(weight: torch.Tensor, groups: int, merge: int) -> torch.Tensor:
    """The weight (O, I/g, k, k) of a convolution with ``groups`` groups as the weight (O, merge·I/g, k, k) of one
    with ``groups / merge`` groups: each output channel keeps its group's kernel at its group's place among the
    ``merge`` merged groups and zeros elsewhere. A product (differentiable), so training gets the gradient too."""
    out_channels = weight.shape[0]
    place = torch.arange(out_channels, device=weight.device) // (out_channels // groups) % merge
    mask = F.one_hot(place, merge).to(weight.dtype)
    return (mask[:, :, None, None, None] * weight[:, None]).flatten(1, 2)


def depthwise_then_sum(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...],
                       padding: tuple[int, ...] | str, dilation: tuple[int, ...]) -> torch.Tensor:
    """A grouped convolution with one output channel per group, weight (G, C/G, k, k), as a depthwise convolution
    (input channel i convolved with its own slice of its group's kernel) followed by the sum of each group's C/G
    results. Exactly the grouped convolution's products, summed in another order; differentiable. A channels-last
    input gives a channels-last result, whose group sums run over contiguous channels."""
    groups, per_group = weight.shape[:2]
    y = F.conv2d(x, weight.reshape(groups * per_group, 1, *weight.shape[2:]), None, stride, padding, dilation,
                 groups * per_group)
    if is_channels_last(y):
        pixels = y.permute(0, 2, 3, 1)
        # a pair: one strided add, 2-3× faster than PyTorch's reduction over an innermost dimension of 2
        summed = pixels[..., 0::2] + pixels[..., 1::2] if per_group == 2 else \
            pixels.unflatten(3, (groups, per_group)).sum(4)
        summed = summed.permute(0, 3, 1, 2)
    else:
        summed = y.unflatten(1, (groups, per_group)).sum(2)
    return summed if bias is None else summed + bias.view(1, -1, 1, 1)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D tensor is laid out (B, H, W, C) in memory (and not also plain contiguous, as 1×1 maps are)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """The backbones run channels-last on CPU: oneDNN's convolutions (depthwise ones above all) are several times
    faster on it and the LayerNorms become one fused pass. Values are unchanged, only the memory layout."""
    return x.contiguous(memory_format=torch.channels_last)


class SimpleGate(nn.Module):
    """Halve the channels by multiplying the two halves: NAFNet's parameter-free nonlinearity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return x1 * x2


class KernelBasisAttention(nn.Module):
    """Stateless wrapper of ``kbnet.ops.kba``, so hooks (MAC counting, profiling) can see each KBA call.

    The kernel bases themselves stay parameters of the enclosing block (``w``, ``b``) to keep the official
    state-dict names. ``impl`` picks the implementation of this call site (one of ``kbnet.ops.IMPLEMENTATIONS``);
    ``None`` follows ``kbnet.ops.use_kba`` / ``$KBNET_KBA``.
    """

    def __init__(self, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.groups = groups
        self.impl: str | None = None

    def forward(self, x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return kba(x, att, weight, bias, self.kernel_size, self.groups, impl=self.impl)

    def extra_repr(self) -> str:
        impl = "" if self.impl is None else f", impl={self.impl!r}"
        return f"kernel_size={self.kernel_size}, groups={self.groups}{impl}"


def kernel_bases(nset: int, channels: int, group_channels: int, kernel_size: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Kernel bases ``w`` (1, nset, C·gc·k²) and bias bases ``b`` (1, nset, C), initialised as the official code.

    ``kaiming_uniform_(a=√5)`` on the 3-D weight gives the bound 1/sqrt(nset·C·gc·k²); the bias uses the same bound.
    """
    weight = nn.Parameter(torch.empty(1, nset, channels * group_channels * kernel_size**2))
    bias = nn.Parameter(torch.empty(1, nset, channels))
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(weight.shape[1] * weight.shape[2])
    nn.init.uniform_(bias, -bound, bound)
    return weight, bias


def fusion_conv_groups(channels: int, most: int, owner: str) -> int:
    """Groups of the grouped 3×3 conv that predicts the fusion coefficients: the official ``min(channels, most)``.

    Refuses, naming the channels, a width it cannot split (torch would only say "in_channels must be divisible by
    groups"): every level's width must be at most ``most`` or a multiple of it."""
    groups = min(channels, most)
    if channels % groups:
        raise ValueError(f"{owner}: {channels} channels do not split into the {groups} groups of the official grouped "
                         f"conv2 (min(channels, {most})); every level's width must be ≤ {most} or a multiple of it")
    return groups


def scale_parameter(channels: int, value: float = 1e-2) -> nn.Parameter:
    """A learnable per-channel scale (1, C, 1, 1); the official blocks start all of them at 1e-2."""
    return nn.Parameter(torch.full((1, channels, 1, 1), value))

