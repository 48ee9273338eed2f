"""KBNet_l: the Restormer-style U-Net of KBNet, used for deraining and defocus deblurring."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kbnet.models.layers import (
    GlobalAvgPool2d,
    GroupedConv2d,
    KernelBasisAttention,
    LayerNorm2d,
    SimpleGate,
    fusion_conv_groups,
    is_channels_last,
    kernel_bases,
    scaled_add,
    to_channels_last,
)
from kbnet.models.padding import PadMode, pad_to_multiple

FUSION_GROUPS = 24
"""Most groups of the 3×3 conv that predicts the fusion coefficients (official ``interc = min(dim, 24)``)."""
NORMALIZE_EPS = 1e-12
"""``F.normalize``'s default: norms are clamped to it before dividing."""


class MFF(nn.Module):
    """Multi-axis feature fusion of KBNet_l: GELU(spatial conv) × KBA(enhanced feature) × channel attention."""

    def __init__(self, dim: int, ffn_expansion_factor: float = 1.5, bias: bool = False, nset: int = 32,
                 kernel_size: int = 3, group_channels: int = 2) -> None:
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        if hidden % group_channels:
            raise ValueError(f"MFF: hidden channels {hidden} not divisible by group_channels {group_channels}")
        interc = fusion_conv_groups(dim, FUSION_GROUPS, "MFF (KBNetL dim, 2·dim, 4·dim, 8·dim, e.g. dim=48)")
        self.w, self.b = kernel_bases(nset, hidden, group_channels, kernel_size)
        self.attgamma = nn.Parameter(torch.full((1, nset, 1, 1), 1e-2))
        self.ga1 = nn.Parameter(torch.full((1, hidden, 1, 1), 1e-2))
        self.dwconv = nn.Sequential(nn.Conv2d(dim, hidden, 1, bias=bias),
                                    nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=bias))
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)
        self.sca = nn.Sequential(GlobalAvgPool2d(), nn.Conv2d(dim, hidden, 1, bias=True))
        self.conv1 = nn.Sequential(nn.Conv2d(dim, hidden, 1, bias=bias),
                                   nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=bias))
        self.conv2 = nn.Sequential(GroupedConv2d(dim, interc, 3, padding=1, groups=interc, bias=True), SimpleGate(),
                                   nn.Conv2d(interc // 2, nset, 1, bias=True))
        self.conv211 = nn.Conv2d(dim, nset, 1, bias=True)
        self.kba = KernelBasisAttention(kernel_size, hidden // group_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The KBA branch first and the spatial branch inline: fewer full-size maps are alive at once (the peak
        # memory of a large image).
        att = scaled_add(self.conv211(x), self.conv2(x), self.attgamma)
        uf = self.conv1(x)
        x2 = scaled_add(uf, self.kba(uf, att, self.w, self.b), self.ga1)
        del att, uf
        return self.project_out(F.gelu(self.dwconv(x)) * x2 * self.sca(x))


class TransAttention(nn.Module):
    """Restormer's multi-Dconv head transposed attention: a C×C attention map per head, linear in H·W.

    On a channels-last map the queries, keys and values are read in place as (B, H·W, C) token matrices, and the
    L2 normalisation over H·W is applied to the C×C product instead of to q and k:
    normalize(q)ᵀ·normalize(k) = diag(1/|q|)·qᵀk·diag(1/|k|). Same maths, no (B, C, H·W) copies. Without autograd
    (inference) q, k and v are projected one after the other, with the matching slices of the two convolutions'
    weights, so a large image never holds the two 3C-channel maps of the fused projection at once.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"TransAttention: dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_channels_last(x):
            # On the meta device (MAC counting) the modules are called, so their hooks see both convolutions.
            lean = not torch.is_grad_enabled() and not x.is_meta
            qkv = self._project_one_by_one(x) if lean else self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
            attended = self._attend_tokens(*qkv)
            del qkv  # free q, k, v before the projection allocates its output
            return self.project_out(attended)
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return self.project_out((attn @ v).reshape(b, c, h, w))

    def _project_one_by_one(self, x: torch.Tensor) -> list[torch.Tensor]:
        c = x.shape[1]
        maps = []
        for i in range(3):
            part = slice(i * c, (i + 1) * c)
            y = F.conv2d(x, self.qkv.weight[part], None if self.qkv.bias is None else self.qkv.bias[part])
            dw_bias = None if self.qkv_dwconv.bias is None else self.qkv_dwconv.bias[part]
            maps.append(F.conv2d(y, self.qkv_dwconv.weight[part], dw_bias, padding=1, groups=c))
        return maps

    def _attend_tokens(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, c, h, w = q.shape
        heads = self.num_heads
        # (B, heads, H·W, C/heads) views of the channels-last memory
        q, k, v = (t.permute(0, 2, 3, 1).reshape(b, h * w, heads, -1).transpose(1, 2) for t in (q, k, v))
        norm_q, norm_k = (t.square().sum(2).sqrt().clamp_min(NORMALIZE_EPS).unsqueeze(-1) for t in (q, k))
        gram = _gram(q, k)  # (B, heads, C/heads, C/heads)
        attn = (gram / (norm_q * norm_k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        out = (v @ attn.transpose(-2, -1)).transpose(1, 2).reshape(b, h, w, c)
        return out.permute(0, 3, 1, 2)


def _gram(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """qᵀ·k of (B, heads, H·W, C/heads) token views. In eager mode on the CPU one matrix product per image and head
    reads the strided views in place, where a batched bf16 product first copies its transposed operand (10 ms at
    96 channels, 256², more than the product). Other devices, and graphs being captured (``torch.export``,
    ``torch.compile``: the loop would fix the batch size and strides), take the batched product."""
    if q.device.type != "cpu" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return q.transpose(-2, -1) @ k
    return torch.stack([torch.stack([torch.mm(qh.t(), kh) for qh, kh in zip(qb, kb, strict=True)])
                        for qb, kb in zip(q, k, strict=True)])


class KBBlockL(nn.Module):
    """``x + MFF(LN(x))`` then ``x + MDTA(LN(x))``; the official names are swapped (``attn`` is the MFF)."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float = 1.5, bias: bool = False,
                 nset: int = 32, kernel_size: int = 3, group_channels: int = 2) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(dim)
        self.attn = MFF(dim, ffn_expansion_factor, bias, nset, kernel_size, group_channels)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = TransAttention(dim, num_heads, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """3×3 conv to C/2 then PixelUnshuffle(2): C → 2C at half resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """3×3 conv to 2C then PixelShuffle(2): C → C/2 at double resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class KBNetL(nn.Module):
    """KBNet_l: Restormer's 4-level U-Net with concatenation skips, built from ``KBBlockL``.

    The official network needs H and W divisible by 8; this one reflect-pads right/bottom to ``size_multiple``
    (``pad_mode``, as the official test scripts do outside the network) and crops the result, so any size works and
    multiples of 8 give exactly the official output. The global residual needs ``inp_channels == out_channels`` and
    is left out otherwise (the official network always adds it).
    """

    size_multiple: int = 8
    """Three PixelUnshuffle(2) downsamplings need H and W divisible by 8."""
    pad_mode: PadMode = "reflect"
    """How ``forward`` fills the missing rows and columns: mirrored, as the official test scripts pad."""

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 1.5, bias: bool = False,
                 nset: int = 32, kernel_size: int = 3, group_channels: int = 2) -> None:
        super().__init__()
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError(f"KBNetL: num_blocks {list(num_blocks)} and heads {list(heads)} need 4 entries "
                             "(three encoder levels and the latent level)")

        def level(ch: int, n: int, nh: int) -> nn.Sequential:
            return nn.Sequential(*[KBBlockL(ch, nh, ffn_expansion_factor, bias, nset, kernel_size, group_channels)
                                   for _ in range(n)])

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim, bias)
        self.encoder_level1 = level(dim, num_blocks[0], heads[0])
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = level(dim * 2, num_blocks[1], heads[1])
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = level(dim * 4, num_blocks[2], heads[2])
        self.down3_4 = Downsample(dim * 4)
        self.latent = level(dim * 8, num_blocks[3], heads[3])
        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, 1, bias=bias)
        self.decoder_level3 = level(dim * 4, num_blocks[2], heads[2])
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=bias)
        self.decoder_level2 = level(dim * 2, num_blocks[1], heads[1])
        self.up2_1 = Upsample(dim * 2)
        self.decoder_level1 = level(dim * 2, num_blocks[0], heads[0])
        self.refinement = level(dim * 2, num_refinement_blocks, heads[0])
        self.output = nn.Conv2d(dim * 2, out_channels, 3, padding=1, bias=bias)
        self.residual = inp_channels == out_channels

    def forward(self, inp_img: torch.Tensor) -> torch.Tensor:
        h, w = inp_img.shape[-2:]
        inp = to_channels_last(pad_to_multiple(inp_img, self.size_multiple, self.pad_mode))
        # Each map is dropped right after its last use (``pop``, nested calls): at 2048² one full-resolution map
        # of 48 channels is 0.8 GB, so holding the skips to the end would cost gigabytes.
        skips = [self.encoder_level1(self.patch_embed(inp))]
        skips.append(self.encoder_level2(self.down1_2(skips[-1])))
        skips.append(self.encoder_level3(self.down2_3(skips[-1])))
        x = self.latent(self.down3_4(skips[-1]))
        x = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(x), skips.pop()], 1)))
        x = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(x), skips.pop()], 1)))
        out = self.output(self.refinement(self.decoder_level1(torch.cat([self.up2_1(x), skips.pop()], 1))))
        if self.residual:
            out = out + inp
        return out[:, :, :h, :w].contiguous()
