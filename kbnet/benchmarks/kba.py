"""KBA alone: ``kbnet.ops.kba`` against the official formulation at every per-level shape of KBNet_s and KBNet_l.

    kbnet-bench kba          # the full table (takes several minutes on 2 cores)
    kbnet-bench kba --quick  # tiny shapes, one repeat: a smoke run

For each shape (the KBA levels of KBNet_s and KBNet_l at a 128² and a 256² input, batch 1 and 2) it times the
forward pass and forward+backward (gradients of all four inputs), interleaving the implementations, and measures
their peak memory in fresh worker processes (see ``kbnet.benchmarks.common``). Ratios are reference / ours: above 1
means ours is faster or leaner. Ours also runs under bf16 autocast where KBA has bf16 kernels (AVX512_BF16; with
AMX also without the tile kernels, ``vdpbf16ps`` only); its rates are given as a share of the matmul rate of the same
dtype, measured in the same run (FLOPs: the official formulation's MACs ×2, a forward+backward counted as 3× the
forward).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from kbnet import allocator
from kbnet.benchmarks.command import benchmark_parser, positive_int
from kbnet.benchmarks.common import (
    MEMORY_METHOD,
    add_comparison_options,
    comparison,
    machine_line,
    matmul_rates,
    mib,
    ms,
    peak_bytes,
    percent,
    ratio,
    run_worker,
    time_calls,
)
from kbnet.cli import user_errors
from kbnet.markdown import markdown_table
from kbnet.ops import kba, native

NSET = 32
KERNEL = 3


@dataclass(frozen=True)
class Case:
    """One KBA call: ``channels`` at 1/``scale`` of an ``input_size``² image, ``group_channels`` per group."""

    net: str
    level: str
    channels: int
    group_channels: int
    scale: int
    input_size: int
    batch: int

    @property
    def size(self) -> int:
        return self.input_size // self.scale

    @property
    def groups(self) -> int:
        return self.channels // self.group_channels

    @property
    def gmacs(self) -> float:
        """Multiply-accumulates of the kernel fusion and application in the official formulation:
        C·gc·k²·(nset+1) + nset·C per pixel."""
        per_basis = self.channels * self.group_channels * KERNEL**2
        return self.batch * self.size**2 * (per_basis * (NSET + 1) + NSET * self.channels) / 1e9

    @property
    def kernel_gmacs(self) -> float:
        """Multiply-accumulates the fused native kernels execute for a forward and backward: the forward, grad_att,
        grad_x and grad_w each apply all nset bases to every pixel's neighbourhood (nset·C·gc·k²), plus the mixing
        (3·nset·C) and grad_x's application of the fused kernel to grad_out (C·gc·k²). The official formulation
        needs 3× its forward instead, because it keeps every pixel's fused kernel (C·gc·k² values) from the forward
        for the backward, the memory the fused kernels save."""
        per_basis = self.channels * self.group_channels * KERNEL**2
        return self.batch * self.size**2 * (4 * NSET * per_basis + 3 * NSET * self.channels + per_basis) / 1e9


LEVELS = {  # per backbone: channels per group, then (level, channels entering KBA, downscale)
    "KBNet_s": (4, [("L1", 64, 1), ("L2", 128, 2), ("L3", 256, 4), ("L4", 512, 8), ("middle", 1024, 16)]),
    "KBNet_l": (2, [("enc1", 72, 1), ("dec1/refine", 144, 1), ("L2", 144, 2), ("L3", 288, 4), ("latent", 576, 8)]),
}
QUICK_LEVELS = {"KBNet_s": (4, [("L1/8", 8, 1), ("L2/8", 16, 2)]), "KBNet_l": (2, [("L1/8", 18, 1)])}


SIZES = (128, 256)
REPEATS = 5


def cases(quick: bool, sizes: Sequence[int] = SIZES) -> list[Case]:
    levels, sizes, batches = (QUICK_LEVELS, (32,), (1, 2)) if quick else (LEVELS, sizes, (1, 2))
    return [Case(net, level, c, gc, scale, size, batch)
            for net, (gc, net_levels) in levels.items() for level, c, scale in net_levels
            for size in sizes for batch in batches]


def inputs(case: Case, requires_grad: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    c, s, gc = case.channels, case.size, case.group_channels
    tensors = [torch.randn(case.batch, c, s, s, generator=gen), torch.randn(case.batch, NSET, s, s, generator=gen),
               torch.randn(1, NSET, c * gc * KERNEL**2, generator=gen) * 0.01,
               torch.randn(1, NSET, c, generator=gen) * 0.01]
    return [t.requires_grad_(requires_grad) for t in tensors]


FUSED_NOTE = (", and for the native kernels' f+b also the FLOPs they execute (their backward applies the bases "
              "three times, 4× the forward in all: they never store a fused kernel per pixel)")
BF16 = "bf16"
"""The name of the variant that runs the subject implementation under bf16 autocast."""
NO_AMX = "bf16 vdpbf16ps"
"""The bf16 variant without AMX tiles (measured where the kernels use them, to show what they add)."""


def step(case: Case, impl: str, backward: bool, tensors: list[torch.Tensor], grad: torch.Tensor, bf16: bool = False,
         amx: bool = True):
    """The measured call: forward only (no graph) or forward and backward, optionally under bf16 autocast (and
    without the AMX tile kernels)."""
    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
                (contextlib.nullcontext() if amx else native.amx_disabled()):
            if backward:
                for t in tensors:
                    t.grad = None
                out = kba(*tensors, KERNEL, case.groups, impl=impl)
                out.backward(grad.to(out.dtype))
            else:
                with torch.no_grad():
                    kba(*tensors, KERNEL, case.groups, impl=impl)
    return run


def worker(payload: dict) -> dict:
    """Peak memory of one implementation on every case (runs in a fresh process)."""
    torch.set_num_threads(payload["threads"])
    peaks = []
    for fields in payload["cases"]:
        case = Case(**fields)
        tensors = inputs(case, requires_grad=True)
        grad = torch.randn(case.batch, case.channels, case.size, case.size)
        peaks.append({mode: peak_bytes(step(case, payload["impl"], mode == "fwd+bwd", tensors, grad))
                      for mode in ("fwd", "fwd+bwd")})
    return {"peaks": peaks}


def measure(selected: Sequence[Case], impls: Sequence[str], repeats: int, threads: int, memory: bool,
            bf16: bool = False, no_amx: bool = False) -> list[dict]:
    peaks = {impl: run_worker("kbnet.benchmarks.kba", {"impl": impl, "threads": threads,
                                                 "cases": [asdict(c) for c in selected]}, threads)["peaks"]
             for impl in impls} if memory else {}
    results = []
    for i, case in enumerate(selected):
        tensors = inputs(case, requires_grad=True)
        grad = torch.randn(case.batch, case.channels, case.size, case.size)
        row = {"case": case}
        for mode in ("fwd", "fwd+bwd"):
            variants = {impl: step(case, impl, mode == "fwd+bwd", tensors, grad) for impl in impls}
            if bf16:
                variants[BF16] = step(case, impls[0], mode == "fwd+bwd", tensors, grad, bf16=True)
            if no_amx:
                variants[NO_AMX] = step(case, impls[0], mode == "fwd+bwd", tensors, grad, bf16=True, amx=False)
            row[mode] = time_calls(variants, repeats)
        row["peak"] = {impl: peaks[impl][i] for impl in peaks}
        results.append(row)
    return results


def report(results: list[dict], impls: Sequence[str], rates: dict[str, float], fused: bool) -> str:
    """The table; ``fused``: the subject runs the native kernels, whose forward+backward share is also given on the
    FLOPs they execute (``Case.kernel_gmacs``)."""
    ours, ref = impls[0], impls[-1]
    bf16 = BF16 in results[0]["fwd"] if results else False
    header = ["net", "level", "C/gc", "H×W", "B", "GMAC",
              f"fwd {ours} ms", f"fwd {ref} ms", "fwd ×", f"f+b {ours} ms", f"f+b {ref} ms", "f+b ×", "f+b CPU-time ×",
              f"f+b peak {ours} MiB", f"f+b peak {ref} MiB", "memory ×", f"fwd peak {ours} MiB", f"fwd peak {ref} MiB",
              f"fwd {ours} % fp32 mm", f"f+b {ours} % fp32 mm"]
    header += [f"f+b {ours} % fp32 mm, kernel FLOPs"] * fused
    header += ["bf16 fwd ms", "bf16 f+b ms", "fp32/bf16 fwd ×", "bf16 fwd % bf16 mm", "bf16 f+b % bf16 mm"] * bf16
    no_amx = NO_AMX in results[0]["fwd"] if results else False
    header += ["vdpbf16ps fwd ms", "vdpbf16ps f+b ms", "AMX fwd ×", "AMX f+b ×"] * no_amx
    rows = []
    for r in results:
        c, fwd, fb, peak = r["case"], r["fwd"], r["fwd+bwd"], r["peak"]
        mem = [mib(peak[ours]["fwd+bwd"]), mib(peak[ref]["fwd+bwd"]),
               ratio(peak[ref]["fwd+bwd"], peak[ours]["fwd+bwd"]),
               mib(peak[ours]["fwd"]), mib(peak[ref]["fwd"])] if peak else ["n/a"] * 5
        def share(timing, factor: int, dtype: str, gmacs: float = c.gmacs) -> str:
            return percent(factor * 2 * gmacs / timing.wall, rates[dtype])
        row = [c.net, c.level, f"{c.channels}/{c.group_channels}", f"{c.size}²", c.batch, f"{c.gmacs:.2f}",
               ms(fwd[ours].wall), ms(fwd[ref].wall), ratio(fwd[ref].wall, fwd[ours].wall),
               ms(fb[ours].wall), ms(fb[ref].wall), ratio(fb[ref].wall, fb[ours].wall),
               ratio(fb[ref].cpu, fb[ours].cpu), *mem, share(fwd[ours], 1, "float32"), share(fb[ours], 3, "float32")]
        row += [share(fb[ours], 1, "float32", c.kernel_gmacs)] * fused
        if bf16:
            row += [ms(fwd[BF16].wall), ms(fb[BF16].wall), ratio(fwd[ours].wall, fwd[BF16].wall),
                    share(fwd[BF16], 1, "bfloat16"), share(fb[BF16], 3, "bfloat16")]
        if no_amx:
            row += [ms(fwd[NO_AMX].wall), ms(fb[NO_AMX].wall), ratio(fwd[NO_AMX].wall, fwd[BF16].wall),
                    ratio(fb[NO_AMX].wall, fb[BF16].wall)]
        rows.append(row)
    return markdown_table(header, rows)


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_parser("kba", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and one repeat (smoke run)")
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=list(SIZES),
                        help="input sizes whose per-level shapes are measured (default: 128 256)")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="time with training's allocator setting (freed memory kept, see kbnet.allocator) "
                             "instead of glibc's default, under which every call faults its fresh planes in")
    add_comparison_options(parser, REPEATS)
    args = parser.parse_args(argv)
    retained = args.retain_freed_memory and allocator.retain_freed_memory()
    if args.retain_freed_memory and not retained:
        parser.error("--retain-freed-memory needs glibc's malloc and KBNET_RETAIN_FREED_MEMORY unset or 1")
    run = comparison(parser, args, REPEATS)
    impls, repeats = run.impls, run.repeats
    torch.set_num_threads(args.threads)
    no_amx = run.bf16 and "AMX-BF16" in native.instruction_sets()  # then also time bf16 without the tiles
    selected = cases(args.quick, args.sizes)
    results = measure(selected, impls, repeats, args.threads, run.memory, run.bf16, no_amx)
    fused = impls[0] in ("auto", "native") and all(
        native.supports(torch.empty(0, c.channels, 0, 0), c.groups) for c in selected) and native.available()
    rates = matmul_rates(1024 if args.quick else 2048)
    bf16_note = run.bf16_note(f"{impls[0]} under bf16 autocast (bf16 kernels, float32 sums)")
    if no_amx:
        bf16_note += "; vdpbf16ps: the same without the AMX tile kernels, AMX × = vdpbf16ps / bf16"
    print(f"KBA ({NSET} bases, {KERNEL}×{KERNEL}), float32 inputs. {machine_line(args.threads, rates)}. "
          f"Times: median of {repeats} wall-clock runs, implementations interleaved; × = {impls[-1]} / {impls[0]}. "
          f"% mm = achieved GFLOP/s over the matmul rate of the dtype; FLOPs: the official formulation's (f+b = 3× "
          f"its forward){FUSED_NOTE * fused}. {bf16_note}. "
          f"Allocator of the timed runs: {'freed memory kept (as in training)' if retained else 'glibc default'}. "
          f"Peak memory: {MEMORY_METHOD if run.memory else 'not measured'}.\n")
    print(report(results, impls, rates, fused))
    return 0


if __name__ == "__main__":
    sys.exit(main())
