"""``kbnet-bench``: the benchmarks as one console command, ``kbnet-bench <benchmark> [its options]``.

The command only picks the benchmark module and hands it the rest of the command line, so every benchmark keeps
its own options (``kbnet-bench kba --help``), its error handling (``kbnet.cli.user_errors``) and its exit status,
and stays runnable as ``python -m kbnet.benchmarks.<benchmark>``. The module is imported once chosen: the
overview (``kbnet-bench --help``) loads no torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

BENCHMARKS = {
    "kba": "KBA alone per level of KBNet_s and KBNet_l, against the official formulation: time, memory, % of matmul",
    "models": "whole backbones per preset: inference and a training step, time, memory, largest image in one piece",
    "deploy": "inference in onnxruntime vs eager vs torch.compile, and the two exported KBA formulations",
    "layer_norm": "the channel LayerNorm per level of both backbones: native kernels vs PyTorch, float32 and bf16",
    "grouped_conv": "the fusion-coefficient convolutions per level and in whole backbones: grouped vs depthwise",
    "allocator": "glibc's default malloc vs freed memory kept for reuse: training steps, inference, faults, peak",
    "gpu": "the GPU benchmark: agreement, KBA per level, backbones, train.py throughput, launches, with targets",
}
"""Each benchmark module of ``kbnet.benchmarks`` with its line in the overview."""


def benchmark_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of one benchmark: named as ``kbnet-bench`` runs it, described by its module docstring's first
    paragraph."""
    return argparse.ArgumentParser(prog=f"kbnet-bench {name}", description=doc.split("\n\n")[0])


def positive_int(text: str) -> int:
    """An argparse type for counts (threads, repeats, image sides): 0 or less is a usage error, not a traceback or
    a silent default."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    width = max(map(len, BENCHMARKS))
    overview = "\n".join(f"  {name.ljust(width)}  {line}" for name, line in BENCHMARKS.items())
    parser = argparse.ArgumentParser(
        prog="kbnet-bench", usage="%(prog)s [-h] BENCHMARK [OPTION ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmarks of this project's fast paths against the official ones; each prints Markdown tables.",
        epilog=f"benchmarks:\n{overview}\n\n`kbnet-bench BENCHMARK --help` lists the options of one benchmark; "
               "`kbnet-bench BENCHMARK --quick` is its smoke run.")
    parser.add_argument("benchmark", choices=BENCHMARKS, metavar="BENCHMARK", help=f"one of {', '.join(BENCHMARKS)}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: the chosen benchmark's exit status; 2 with argparse's message for an unknown one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = build_parser().parse_args(argv[:1]).benchmark  # everything after the name is the benchmark's
    return importlib.import_module(f"kbnet.benchmarks.{name}").main(argv[1:])
