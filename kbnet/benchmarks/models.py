"""Whole backbones: each preset with ``kbnet.ops.kba`` against the same network running the official KBA.

    kbnet-bench models            # full tables (about half an hour on 2 cores)
    kbnet-bench models --quick    # tiny presets at 16², one repeat: a smoke run
    kbnet-bench models --models kbnet_l --verify-size 2048   # also restore one 2048² image for real
    kbnet-bench models --compile  # + torch.compile columns (the subject's KBA, compiled after warm-up)

Measured per preset: inference on one 256² image, and one training step at 128², batch 2 (forward, L1 loss,
backward, AdamW step): median time and peak memory of both variants, their ratios, the achieved GFLOP/s and the
"floor", the time the operation's FLOPs would take at the machine's measured matmul rate (FLOPs: every conv and
matmul MAC ×2, KBA counted in the official formulation; a training step counted as 3× the forward). The largest
image each variant restores in one piece within the memory budget comes from the inference peaks at two sizes
(memory grows linearly with the pixel count) plus the weights.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kbnet.benchmarks.command import benchmark_parser, positive_int
from kbnet.benchmarks.common import (
    MEMORY_METHOD,
    add_comparison_options,
    comparison,
    floor_seconds,
    machine_line,
    matmul_rates,
    mib,
    ms,
    peak_bytes,
    ratio,
    run_worker,
    time_calls,
)
from kbnet.cli import user_errors
from kbnet.inference import inference_model
from kbnet.inference.loading import model_size_multiple
from kbnet.markdown import markdown_table
from kbnet.models import create_model
from kbnet.models.registry import preset_kwargs
from kbnet.models.summary import count_macs, count_parameters
from kbnet.ops import use_kba

FULL = {"models": ("kbnet_s_sidd", "kbnet_s", "kbnet_l"), "infer": 256, "train": 128, "fit": (128, 256)}
QUICK = {"models": ("kbnet_s_tiny", "kbnet_l_tiny"), "infer": 16, "train": 16, "fit": (8, 16)}
TRAIN_BATCH = 2
REPEATS = 3


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name)


def inference(model: torch.nn.Module, impl: str, size: int, bf16: bool = False):
    """One pass on a size² image; bf16 runs a bfloat16 copy of the model under autocast, as ``kbnet-restore
    --precision bf16`` does (``inference_model``)."""
    x = torch.rand(1, 3, size, size)
    if bf16:
        model = inference_model(copy.deepcopy(model), torch.device("cpu"), "bf16")

    def run() -> None:
        with torch.no_grad(), use_kba(impl), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x)
    return run


def training_step(model: torch.nn.Module, impl: str, size: int, bf16: bool = False):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the training recipe
    x, y = torch.rand(TRAIN_BATCH, 3, size, size), torch.rand(TRAIN_BATCH, 3, size, size)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with use_kba(impl), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.l1_loss(model(x).float(), y)
        loss.backward()
        optimizer.step()
    return run


def worker(payload: dict) -> dict:
    """Peak memory of one preset with one KBA implementation (runs in a fresh process)."""
    torch.set_num_threads(payload["threads"])
    impl = payload["impl"]
    model = build(payload["model"]).eval()
    fit = {size: peak_bytes(inference(model, impl, size)) for size in payload["fit"]}
    small = inference(model, impl, min(payload["fit"]))
    verify = {size: peak_bytes(inference(model, impl, size), warmup=small) for size in payload["verify"]}
    train = peak_bytes(training_step(model.train(), impl, payload["train"]))
    return {"fit": fit, "verify": verify, "train": train}


def largest_side(fit: dict[str, int], weights: int, budget: int, multiple: int) -> str:
    """The side of the largest square image whose predicted peak (linear in pixels) fits the budget, rounded down
    to the model's size ``multiple`` (a side it runs without padding), as ``"N²"``; ``"-"`` when the two peaks do not
    resolve any growth (the tiny sizes of a quick run can measure equal)."""
    (s0, p0), (s1, p1) = sorted((int(s), p) for s, p in fit.items())
    per_pixel = (p1 - p0) / (s1**2 - s0**2)
    if per_pixel <= 0:
        return "-"
    fixed = p0 - per_pixel * s0**2
    pixels = (budget - weights - fixed) / per_pixel
    return f"{int(math.sqrt(max(pixels, 0)) // multiple * multiple)}²"


def predicted_peak(fit: dict[str, int], weights: int, side: int) -> float:
    (s0, p0), (s1, p1) = sorted((int(s), p) for s, p in fit.items())
    per_pixel = (p1 - p0) / (s1**2 - s0**2)
    return weights + p0 + per_pixel * (side**2 - s0**2)


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_parser("models", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny presets at 16², one repeat (smoke run)")
    parser.add_argument("--models", nargs="+", default=None, help="presets (default: kbnet_s_sidd kbnet_s kbnet_l)")
    parser.add_argument("--budget-gb", type=float, default=16.0, help="memory budget for the largest image (GiB)")
    parser.add_argument("--verify-size", type=positive_int, nargs="*", default=[],
                        help="also measure the subject's peak restoring one image of this side (slow)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the subject compiled with torch.compile (eager / compiled ratio)")
    add_comparison_options(parser, REPEATS)
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    models = args.models or setup["models"]
    for name in models:
        preset_kwargs(name)  # an unknown name fails now, not after minutes of measuring the presets before it
    run = comparison(parser, args, REPEATS)
    impls, repeats, memory, bf16 = run.impls, run.repeats, run.memory, run.bf16
    torch.set_num_threads(args.threads)
    rates = matmul_rates(1024 if args.quick else 2048)
    mm = rates["float32"]
    budget = int(args.budget_gb * 2**30)
    ours, ref = impls[0], impls[-1]

    speed_rows, memory_rows = [], []
    for name in models:
        model = build(name)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        multiple = model_size_multiple(model)
        for task, size, batch in (("inference", setup["infer"], 1), ("train step", setup["train"], TRAIN_BATCH)):
            model.train(task != "inference")
            make = inference if task == "inference" else training_step
            variants = {impl: make(model, impl, size) for impl in impls}
            if bf16:
                variants["bf16"] = make(model, ours, size, bf16=True)
            if args.compile:
                variants["compiled"] = make(torch.compile(model, dynamic=False), ours, size)
            timing = time_calls(variants, repeats)
            flops = 2 * count_macs(model, (3, size, size), include_matmul=True) * batch * (1 if task == "inference"
                                                                                            else 3)
            floor = floor_seconds(flops, mm)
            speed_rows.append([name, task, f"{size}²×{batch}", f"{flops / 1e9:.0f}",
                               ms(timing[ours].wall), ms(timing[ref].wall), ratio(timing[ref].wall, timing[ours].wall),
                               ratio(timing[ref].cpu, timing[ours].cpu),
                               f"{flops / timing[ours].wall / 1e9:.1f}", f"{flops / timing[ref].wall / 1e9:.1f}",
                               ms(floor), ratio(timing[ours].wall, floor)]
                              + ([ms(timing["bf16"].wall), ratio(timing[ours].wall, timing["bf16"].wall),
                                  ms(floor_seconds(flops, rates["bfloat16"])),
                                  ratio(timing["bf16"].wall, floor_seconds(flops, rates["bfloat16"]))] if bf16 else [])
                              + ([ms(timing["compiled"].wall), ratio(timing[ours].wall, timing["compiled"].wall)]
                                 if args.compile else []))
        if memory:
            peaks = {impl: run_worker("kbnet.benchmarks.models", {
                "model": name, "impl": impl, "threads": args.threads, "fit": setup["fit"], "train": setup["train"],
                "verify": args.verify_size if impl == ours else []}, args.threads) for impl in impls}
            infer_key = str(setup["infer"])
            memory_rows.append([
                name, f"{count_parameters(model) / 1e6:.1f}",
                mib(peaks[ours]["fit"][infer_key]), mib(peaks[ref]["fit"][infer_key]),
                ratio(peaks[ref]["fit"][infer_key], peaks[ours]["fit"][infer_key]),
                mib(peaks[ours]["train"]), mib(peaks[ref]["train"]), ratio(peaks[ref]["train"], peaks[ours]["train"]),
                largest_side(peaks[ours]['fit'], weights, budget, multiple),
                largest_side(peaks[ref]['fit'], weights, budget, multiple),
                f"{predicted_peak(peaks[ours]['fit'], weights, 2048) / 2**30:.1f}",
                f"{predicted_peak(peaks[ref]['fit'], weights, 2048) / 2**30:.1f}",
                ", ".join(f"{s}²: {(weights + p) / 2**30:.2f} GiB" for s, p in peaks[ours]["verify"].items()) or "-"])
        del model

    bf16_note = run.bf16_note(f"{ours} under bf16 autocast, floor at the bf16 matmul rate")
    print(f"Backbones, float32. {machine_line(args.threads, rates)}. Times: median of {repeats} wall-clock runs, "
          f"variants interleaved; × = {ref} / {ours} (CPU-time × uses the process CPU time, less sensitive to other "
          f"load); floor = FLOPs at the float32 matmul rate. {bf16_note}.\n")
    compiled = ["compiled ms", f"{ours} eager / compiled"] if args.compile else []
    print(markdown_table(["model", "task", "input", "GFLOP", f"{ours} ms", f"{ref} ms", "×", "CPU-time ×",
                          f"{ours} GFLOP/s", f"{ref} GFLOP/s", "floor ms", f"{ours} / floor"]
                         + ["bf16 ms", "fp32/bf16 ×", "bf16 floor ms", "bf16 / floor"] * bf16 + compiled, speed_rows))
    if memory:
        print(f"\nPeak memory ({MEMORY_METHOD}); largest square image restored in one piece within "
              f"{args.budget_gb:g} GiB = weights + working memory, extrapolated linearly from the inference peaks "
              f"at {setup['fit'][0]}² and {setup['fit'][1]}².\n")
        print(markdown_table(["model", "params (M)", f"infer {ours} MiB", f"infer {ref} MiB", "×",
                              f"train {ours} MiB", f"train {ref} MiB", "×", f"largest {ours}", f"largest {ref}",
                              f"2048² {ours} GiB (pred.)", f"2048² {ref} GiB (pred.)", f"measured {ours}"],
                             memory_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
