"""The channel LayerNorm of channels-last maps: the native kernels against PyTorch's, at every level of the backbones.

    kbnet-bench layer_norm          # KBNet_s and KBNet_l levels at a 256² input, batch 1 and 2
    kbnet-bench layer_norm --quick  # tiny shapes, one repeat: a smoke run

Per level and dtype it times inference (forward, no gradient) and a training forward+backward (gradients of the
map, weight and bias), interleaving the two implementations. float32 maps normalise with float32 parameters; bf16
maps run as under bf16 autocast: PyTorch's path casts the map to float32 for training (its bf16 backward sums the
parameter gradients in bf16) and the result back to bf16, the native kernels read and write bf16 and compute in
float32. × = PyTorch / native: above 1 means the native kernels are faster.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

from kbnet.benchmarks.command import benchmark_parser, positive_int
from kbnet.benchmarks.common import check_level_size, machine_line, matmul_rates, ms, ratio, time_calls
from kbnet.cli import user_errors
from kbnet.errors import UserError
from kbnet.markdown import markdown_table
from kbnet.ops import layer_norm, native

EPS = 1e-6
LEVELS = {  # per backbone: (level, channels of its LayerNorms, downscale)
    "KBNet_s": [("L1", 64, 1), ("L2", 128, 2), ("L3", 256, 4), ("L4", 512, 8), ("middle", 1024, 16)],
    "KBNet_l": [("enc1", 48, 1), ("dec1/refine", 96, 1), ("L2", 96, 2), ("L3", 192, 4), ("latent", 384, 8)],
}
QUICK_LEVELS = {"KBNet_s": [("L1/8", 8, 1)], "KBNet_l": [("L1/8", 6, 1), ("L2/8", 12, 2)]}
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
REPEATS = 10


def _call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, native_kernels: bool,
          train: bool) -> Callable[[], object]:
    """One LayerNorm2d call as the backbones make it (bf16 maps under autocast), with its backward when ``train``."""
    def run() -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=x.dtype == torch.bfloat16), \
                torch.set_grad_enabled(train):
            y = layer_norm.channel_layer_norm(x, weight, bias, EPS, native_kernels).to(x.dtype)
            if train:
                torch.autograd.grad(y, (x, weight, bias), torch.ones_like(y))
        return y
    return run


def rows(levels: dict, size: int, batches: Sequence[int], repeats: int) -> list[list[str]]:
    table = []
    gen = torch.Generator().manual_seed(0)
    for net, net_levels in levels.items():
        for level, channels, scale in net_levels:
            for batch in batches:
                side = size // scale
                for dtype_name, dtype in DTYPES.items():
                    x = torch.randn(batch, channels, side, side, generator=gen).to(dtype)
                    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
                    weight = torch.randn(channels, generator=gen).requires_grad_()
                    bias = torch.randn(channels, generator=gen).requires_grad_()
                    calls = {(impl, train): _call(x, weight, bias, impl == "native", train)
                             for train in (False, True) for impl in ("native", "torch")}
                    t = {key: timing.wall for key, timing in time_calls(calls, repeats).items()}
                    table.append([net, level, f"{channels}×{side}²×{batch}", dtype_name,
                                  ms(t["native", False]), ms(t["torch", False]),
                                  ratio(t["torch", False], t["native", False]),
                                  ms(t["native", True]), ms(t["torch", True]),
                                  ratio(t["torch", True], t["native", True])])
    return table


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_parser("layer_norm", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (smoke run)")
    parser.add_argument("--size", type=positive_int, default=256,
                        help="input side the levels are taken at (default 256)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help=f"timed runs per variant (default {REPEATS})")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args(argv)
    if not native.available():
        raise UserError(f"kbnet-bench layer_norm times the native kernels, which are unavailable here: "
                        f"{native.unavailable_reason()}")
    check_level_size(args.size)
    torch.set_num_threads(args.threads)
    levels, size = (QUICK_LEVELS, 32) if args.quick else (LEVELS, args.size)
    repeats = args.repeats or (1 if args.quick else REPEATS)
    table = rows(levels, size, (1, 2), repeats)
    machine = machine_line(args.threads, matmul_rates(1024))
    print(f"Channel LayerNorm of channels-last maps, native kernels vs PyTorch. {machine}. Median of {repeats} "
          "interleaved runs; train = forward + backward (map, weight and bias gradients); bf16 as under autocast. "
          "× = PyTorch / native.\n")
    print(markdown_table(["net", "level", "C×H²×B", "dtype", "infer native ms", "infer torch ms", "infer ×",
                          "train native ms", "train torch ms", "train ×"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
