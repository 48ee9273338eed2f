"""KBNet_s: the NAFNet-style U-Net of KBNet, used for Gaussian and real-noise denoising."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kbnet.models.layers import (
    GlobalAvgPool2d,
    GroupedConv2d,
    KernelBasisAttention,
    LayerNorm2d,
    SimpleGate,
    fusion_conv_groups,
    kernel_bases,
    scale_parameter,
    scaled_add,
    to_channels_last,
)
from kbnet.models.padding import PadMode, pad_to_multiple

FUSION_GROUPS = 32
"""Most groups of the 3×3 conv that predicts the fusion coefficients (official ``interc = min(c, 32)``)."""
SPATIAL_GROUP_CHANNELS = 4
"""Channels per group of the 5×5 grouped convolution of the spatially-invariant branch (hard-coded ``c // 4``)."""


class KBBlockS(nn.Module):
    """Multi-axis feature fusion block of KBNet_s followed by a SimpleGate feed-forward network.

    Three branches of the normalised input are multiplied: channel attention (``sca``), a spatially-invariant
    convolution (``conv11``) and pixel-adaptive kernel basis attention on the enhanced feature (``conv1``,
    ``conv21``), whose fusion coefficients come from ``conv2``/``conv211``. Attribute names are the official ones so
    official state dicts load unchanged.
    """

    def __init__(self, channels: int, ffn_scale: float = 2.0, lightweight: bool = False, nset: int = 32,
                 kernel_size: int = 3, group_channels: int = 4) -> None:
        super().__init__()
        c = channels
        if c % group_channels:
            raise ValueError(f"KBBlockS: channels {c} not divisible by group_channels {group_channels}")
        interc = fusion_conv_groups(c, FUSION_GROUPS, "KBBlockS (KBNetS width·2^level, e.g. width=64)")
        ffn_ch = int(ffn_scale * c)
        self.w, self.b = kernel_bases(nset, c, group_channels, kernel_size)
        self.ga1 = scale_parameter(c)
        self.attgamma = scale_parameter(nset)
        self.beta = scale_parameter(c)
        self.gamma = scale_parameter(c)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.sca = nn.Sequential(GlobalAvgPool2d(), nn.Conv2d(c, c, 1))
        if lightweight:
            spatial = nn.Conv2d(c, c, 3, padding=1, groups=c)
        else:
            spatial = GroupedConv2d(c, c, 5, padding=2, groups=c // SPATIAL_GROUP_CHANNELS)
        self.conv11 = nn.Sequential(nn.Conv2d(c, c, 1), spatial)
        self.conv1 = nn.Conv2d(c, c, 1)
        self.conv21 = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.conv2 = nn.Sequential(GroupedConv2d(c, interc, 3, padding=1, groups=interc), SimpleGate(),
                                   nn.Conv2d(interc // 2, nset, 1))
        self.conv211 = nn.Conv2d(c, nset, 1)
        self.kba = KernelBasisAttention(kernel_size, c // group_channels)
        self.conv3 = nn.Conv2d(c, c, 1)
        self.conv4 = nn.Conv2d(c, ffn_ch, 1)
        self.sg = SimpleGate()
        self.conv5 = nn.Conv2d(ffn_ch // 2, c, 1)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.norm1(inp)
        sca = self.sca(x)
        x1 = self.conv11(x)
        att = scaled_add(self.conv211(x), self.conv2(x), self.attgamma)
        uf = self.conv21(self.conv1(x))
        x = scaled_add(uf, self.kba(uf, att, self.w, self.b), self.ga1)
        x = self.conv3(x * x1 * sca)
        y = scaled_add(inp, x, self.beta)
        x = self.conv5(self.sg(self.conv4(self.norm2(y))))
        return scaled_add(y, x, self.gamma)


class KBNetS(nn.Module):
    """KBNet_s: U-Net with additive skips; strided 2×2 conv down, 1×1 conv + PixelShuffle up, global residual.

    Inputs of any size work: the image is zero-padded right/bottom to ``size_multiple`` (``pad_mode``), exactly
    as the official ``check_image_size``, and the output cropped back.
    """

    pad_mode: PadMode = "constant"
    """How ``forward`` fills the missing rows and columns: zeros, as the official ``check_image_size``."""

    def __init__(self, img_channel: int = 3, width: int = 64, middle_blk_num: int = 12,
                 enc_blk_nums: Sequence[int] = (2, 2, 4, 8), dec_blk_nums: Sequence[int] = (2, 2, 2, 2),
                 lightweight: bool = False, ffn_scale: float = 2.0, nset: int = 32, kernel_size: int = 3,
                 group_channels: int = 4) -> None:
        super().__init__()
        if len(enc_blk_nums) != len(dec_blk_nums):
            raise ValueError(f"KBNetS: enc_blk_nums {list(enc_blk_nums)} and dec_blk_nums {list(dec_blk_nums)} "
                             "must have the same length (one decoder level per encoder level)")

        def block(ch: int) -> KBBlockS:
            return KBBlockS(ch, ffn_scale=ffn_scale, lightweight=lightweight, nset=nset, kernel_size=kernel_size,
                            group_channels=group_channels)

        self.intro = nn.Conv2d(img_channel, width, 3, padding=1)
        self.ending = nn.Conv2d(width, img_channel, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        chan = width
        for num in enc_blk_nums:
            self.encoders.append(nn.Sequential(*[block(chan) for _ in range(num)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, stride=2))
            chan *= 2
        self.middle_blks = nn.Sequential(*[block(chan) for _ in range(middle_blk_num)])
        for num in dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, chan * 2, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.Sequential(*[block(chan) for _ in range(num)]))
        self.size_multiple: int = 2 ** len(self.encoders)
        """Each level's strided 2×2 conv halves H and W, so the U-Net needs sides divisible by 2**levels (a plain
        attribute, not a buffer: state dicts keep the official keys)."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        h, w = inp.shape[-2:]
        inp = to_channels_last(pad_to_multiple(inp, self.size_multiple, self.pad_mode))
        x = self.intro(inp)
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x)
        for decoder, up in zip(self.decoders, self.ups, strict=True):
            x = decoder(up(x) + skips.pop())  # pop: each skip is freed after its only use
        x = self.ending(x) + inp
        return x[:, :, :h, :w].contiguous()
