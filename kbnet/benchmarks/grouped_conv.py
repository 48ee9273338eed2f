"""The fusion-coefficient convolutions (3×3, one output channel per group) per level: oneDNN's grouped kernels
against ``GroupedConv2d``'s depthwise convolution and group sum, then whole backbones with each form.

    kbnet-bench grouped_conv          # KBNet_s and KBNet_l levels at 256², batch 1 and 2; kbnet_s and kbnet_l
    kbnet-bench grouped_conv --quick  # tiny shapes and presets, one repeat: a smoke run

float32 on the CPU, where ``GroupedConv2d`` takes the depthwise form (bf16 merges groups instead). Per level it
times inference (no gradient) and forward+backward (gradients of the map, weight and bias), interleaving the two
forms; GFLOP/s counts the grouped convolution's multiply-adds (two FLOPs each). The backbones section times each
preset's inference and training step with its ``GroupedConv2d`` modules as they are and as plain ``nn.Conv2d``
(the same parameters). × = grouped / depthwise (or plain / as built): above 1 means the depthwise form is faster.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kbnet.benchmarks.command import benchmark_parser, positive_int
from kbnet.benchmarks.common import check_level_size, machine_line, matmul_rates, ms, ratio, time_calls
from kbnet.benchmarks.models import TRAIN_BATCH, build, inference, training_step
from kbnet.cli import user_errors
from kbnet.markdown import markdown_table
from kbnet.models.kbnet_l import FUSION_GROUPS as KBNET_L_GROUPS
from kbnet.models.kbnet_s import FUSION_GROUPS as KBNET_S_GROUPS
from kbnet.models.layers import GroupedConv2d, depthwise_then_sum

LEVELS = {  # per backbone: the fusion-coefficient convolution's groups, and (level, input channels, downscale)
    "KBNet_s": (KBNET_S_GROUPS, [("L1", 64, 1), ("L2", 128, 2), ("L3", 256, 4), ("L4", 512, 8),
                                 ("middle", 1024, 16)]),
    "KBNet_l": (KBNET_L_GROUPS, [("enc1", 48, 1), ("dec1/refine", 96, 1), ("L2", 96, 2), ("L3", 192, 4),
                                 ("latent", 384, 8)]),
}
QUICK_LEVELS = {"KBNet_s": (4, [("L1/8", 8, 1)]), "KBNet_l": (3, [("L1/8", 6, 1), ("L2/8", 12, 2)])}
FULL = {"models": ("kbnet_s", "kbnet_l"), "size": 256, "infer": 256, "train": 128}
QUICK = {"models": ("kbnet_s_tiny", "kbnet_l_tiny"), "size": 32, "infer": 16, "train": 16}
REPEATS = 5


def _call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, depthwise: bool,
          train: bool) -> Callable[[], object]:
    """One fusion-coefficient convolution in either form, with its backward when ``train``."""
    groups = weight.shape[0]

    def run() -> object:
        with torch.set_grad_enabled(train):
            y = depthwise_then_sum(x, weight, bias, (1, 1), (1, 1), (1, 1)) if depthwise else \
                F.conv2d(x, weight, bias, padding=1, groups=groups)
            if train:
                torch.autograd.grad(y, (x, weight, bias), torch.ones_like(y))
        return y
    return run


def level_rows(levels: dict, size: int, batches: Sequence[int], repeats: int) -> list[list[str]]:
    table = []
    gen = torch.Generator().manual_seed(0)
    for net, (groups, net_levels) in levels.items():
        for level, channels, scale in net_levels:
            for batch in batches:
                side = size // scale
                x = torch.randn(batch, channels, side, side, generator=gen)
                x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
                weight = torch.randn(groups, channels // groups, 3, 3, generator=gen).requires_grad_()
                bias = torch.randn(groups, generator=gen).requires_grad_()
                calls = {(form, train): _call(x, weight, bias, form == "depthwise", train)
                         for train in (False, True) for form in ("grouped", "depthwise")}
                t = {key: timing.wall for key, timing in time_calls(calls, repeats).items()}
                gflop = 2 * batch * side * side * channels * 9 / 1e9
                table.append([net, level, f"{channels}/{groups}", f"{side}²", str(batch),
                              ms(t["grouped", False]), ms(t["depthwise", False]),
                              ratio(t["grouped", False], t["depthwise", False]),
                              f"{gflop / t['grouped', False]:.1f}", f"{gflop / t['depthwise', False]:.1f}",
                              ms(t["grouped", True]), ms(t["depthwise", True]),
                              ratio(t["grouped", True], t["depthwise", True])])
    return table


def with_plain_convolutions(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``GroupedConv2d`` modules are plain ``nn.Conv2d`` (same parameters and buffers)."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if type(module) is GroupedConv2d:
            module.__class__ = nn.Conv2d
    return plain


def model_rows(names: Sequence[str], infer: int, train: int, repeats: int) -> list[list[str]]:
    table = []
    for name in names:
        model = build(name)
        variants = {"as built": model, "plain": with_plain_convolutions(model)}
        for task, side in (("inference", infer), ("train step", train)):
            calls = {key: inference(net.eval(), "auto", side) if task == "inference" else
                     training_step(net.train(), "auto", side) for key, net in variants.items()}
            t = {key: timing.wall for key, timing in time_calls(calls, repeats).items()}
            shape = f"{side}²×{1 if task == 'inference' else TRAIN_BATCH}"
            table.append([name, task, shape, ms(t["as built"]), ms(t["plain"]), ratio(t["plain"], t["as built"])])
    return table


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_parser("grouped_conv", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and presets, one repeat (smoke run)")
    parser.add_argument("--size", type=positive_int, default=FULL["size"],
                        help=f"input side the levels are taken at (default {FULL['size']})")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help=f"timed runs per variant (default {REPEATS})")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--no-models", action="store_true", help="skip the whole-backbone section")
    args = parser.parse_args(argv)
    check_level_size(args.size)
    torch.set_num_threads(args.threads)
    setup, levels = (QUICK, QUICK_LEVELS) if args.quick else (FULL, LEVELS)
    size = setup["size"] if args.quick else args.size
    repeats = args.repeats or (1 if args.quick else REPEATS)
    machine = machine_line(args.threads, matmul_rates(1024))
    print(f"Fusion-coefficient convolution (3×3, one output per group), float32 channels-last: oneDNN's grouped "
          f"kernels vs depthwise then group sum. {machine}. Median of {repeats} interleaved runs; f+b = forward + "
          "backward (map, weight and bias gradients). × = grouped / depthwise.\n")
    print(markdown_table(["net", "level", "C/groups", "H×W", "B", "infer grouped ms", "infer depthwise ms",
                          "infer ×", "grouped GFLOP/s", "depthwise GFLOP/s", "f+b grouped ms", "f+b depthwise ms",
                          "f+b ×"], level_rows(levels, size, (1, 2), repeats)))
    if not args.no_models:
        print(f"\nBackbones, float32: GroupedConv2d as built vs plain nn.Conv2d (the same weights). Median of "
              f"{repeats} interleaved runs; training step = forward, L1 loss, backward, fused AdamW, batch "
              f"{TRAIN_BATCH}. × = plain / as built.\n")
        print(markdown_table(["model", "task", "input", "as built ms", "plain ms", "×"],
                             model_rows(setup["models"], setup["infer"], setup["train"], repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
