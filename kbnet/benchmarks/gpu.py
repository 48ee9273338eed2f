"""The GPU benchmark: every number of the first GPU run, one command, checked against the targets.

    kbnet-bench gpu          # on one CUDA GPU (a few minutes)
    kbnet-bench gpu --quick  # tiny shapes, one repeat: a smoke run (CPU or GPU; part of the tests)

Sections, in order: (1) agreement of every implementation available on the device with the official formulation
(computed in float64), per level shape of both backbones, float32 and bfloat16; (2) KBA alone per level of KBNet_s
and KBNet_l at batch 8, 128² input: forward and forward+backward, float32 and bfloat16, every implementation;
(3) whole backbones, ours against the official formulation in the same network: inference at 256² and 512², a
training step at batch 8, 128² and batch 2, 256², float32 and bf16-mixed; (4) a short real ``train.py`` run
(experiment ``kbnet_s_sidd`` on generated images on disk) for images/s; (5) the launch table: ATen calls plus
Triton launches per training step per implementation (device independent, counted on fake tensors).

Times are medians of CUDA-event timed calls on a GPU (wall clock on CPU); memory is ``max_memory_allocated`` above
the allocation before the call (CUDA only). Targets of issue #10 are printed with PASS/FAIL. The exit status is 1
when an implementation disagrees with the official formulation beyond tolerance.
"""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F

from kbnet.benchmarks.command import benchmark_parser
from kbnet.benchmarks.common import IMPORT_ROOT, import_path, mib
from kbnet.benchmarks.kba import KERNEL, LEVELS, NSET, QUICK_LEVELS, Case, inputs
from kbnet.cli import user_errors
from kbnet.markdown import markdown_table
from kbnet.models import create_model
from kbnet.ops import kba, kba_triton, launches, native, use_kba
from kbnet.ops.kernel_basis import SLAB_ENV

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FULL = {"models": ("kbnet_s_sidd", "kbnet_l"), "level_input": 128, "level_batch": 8, "check_input": 32,
        "infer": (256, 512), "train": ((8, 128), (2, 256)), "launch": (8, 128), "repeats": 10,
        "train_run": {"model": "kbnet_s_sidd", "steps": 60, "size": 128}}
QUICK = {"models": ("kbnet_s_tiny", "kbnet_l_tiny"), "level_input": 16, "level_batch": 2, "check_input": 16,
         "infer": (16,), "train": ((2, 16),), "launch": (2, 16), "repeats": 1,
         "train_run": {"model": "kbnet_s_tiny", "steps": 2, "size": 16}}
SPEEDUP, MEMORY_SHARE, STEP_SPEEDUP, TORCH_LAUNCH_RATIO = 3.0, 0.25, 2.0, 1.2


def implementations(device: torch.device) -> list[str]:
    """The implementations that run on ``device``, the subject first, the official formulation last."""
    on_device = ["triton"] if kba_triton.unsupported_reason(device.type, torch.float32, 16, NSET, 4, KERNEL) is None \
        else []
    if device.type == "cpu" and native.available():
        on_device.append("native")
    return [*on_device, "torch", "reference"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """``max_memory_allocated`` above the allocation before one call (after a warm-up); ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    fn()
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def level_cases(setup: dict, quick: bool, size: int, batch: int) -> list[Case]:
    levels = QUICK_LEVELS if quick else LEVELS
    return [Case(net, level, c, gc, scale, size, batch) for net, (gc, net_levels) in levels.items()
            for level, c, scale in net_levels]


def _on(tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype, grad: bool) -> list[torch.Tensor]:
    return [t.detach().to(device, dtype).requires_grad_(grad) for t in tensors]


def check_agreement(setup: dict, quick: bool, device: torch.device, impls: Sequence[str]) -> tuple[str, bool]:
    """Output and the four gradients of every implementation against the official formulation in float64."""
    rows, ok = [], True
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for case in level_cases(setup, quick, setup["check_input"], 1):
            base = inputs(case, requires_grad=False)
            for name, dtype in DTYPES.items():
                exact = _on(base, device, dtype, False)
                exact = [t.double().requires_grad_() for t in exact]
                ref = kba(*exact, KERNEL, case.groups, impl="reference")
                grad = torch.randn_like(ref)
                ref.backward(grad)
                for impl in impls[:-1]:
                    if impl == "native" and dtype != torch.float32:
                        continue
                    tensors = _on(base, device, dtype, True)
                    out = kba(*tensors, KERNEL, case.groups, impl=impl)
                    out.backward(grad.to(dtype))
                    worst = max([relative_error(out, ref)] + [relative_error(t.grad, e.grad)
                                                              for t, e in zip(tensors, exact, strict=True)])
                    good = worst < TOLERANCE[dtype]
                    ok &= good
                    rows.append([f"{case.net} {case.level}", name, impl, f"{worst:.1e}", "PASS" if good else "FAIL"])
    finally:
        torch.set_float32_matmul_precision(precision)
    return markdown_table(["level", "dtype", "impl", "max rel. error (out, grads)", "agrees"], rows), ok


def kba_calls(tensors: list[torch.Tensor], groups: int, impl: str,
              grad: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """The measured calls: forward only (no graph), and forward and backward."""
    def forward() -> None:
        with torch.no_grad():
            kba(*tensors, KERNEL, groups, impl=impl)

    def both() -> None:
        for t in tensors:
            t.grad = None
        kba(*tensors, KERNEL, groups, impl=impl).backward(grad)
    return forward, both


def model_call(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor | None, impl: str,
               bf16: bool) -> Callable[[], None]:
    """Inference (``target`` None, no graph) or a training step (forward, L1, backward) of ``model``."""
    def call() -> None:
        with use_kba(impl), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            if target is None:
                with torch.no_grad():
                    model.eval()(x)
            else:
                model.train().zero_grad(set_to_none=True)
                F.l1_loss(model(x), target).backward()
    return call


def kba_levels(setup: dict, quick: bool, device: torch.device, impls: Sequence[str]) -> tuple[str, list[bool]]:
    rows, targets = [], []
    for case in level_cases(setup, quick, setup["level_input"], setup["level_batch"]):
        base = inputs(case, requires_grad=False)
        for name, dtype in DTYPES.items():
            tensors = _on(base, device, dtype, True)
            grad = torch.randn(case.batch, case.channels, case.size, case.size, device=device, dtype=dtype)
            measured = {}
            for impl in impls:
                if impl == "native" and dtype != torch.float32:
                    continue
                forward, both = kba_calls(tensors, case.groups, impl, grad)
                measured[impl] = (median_seconds(forward, setup["repeats"], device),
                                  median_seconds(both, setup["repeats"], device), peak_bytes(both, device))
            ref = measured["reference"]
            for impl, (fwd, fb, peak) in measured.items():
                speedup = ref[1] / fb
                share = None if peak is None or not ref[2] else peak / ref[2]
                verdict = "-"
                if impl == impls[0] and impl != "reference":
                    good = speedup >= SPEEDUP and (share is None or share <= MEMORY_SHARE)
                    targets.append(good)
                    verdict = "PASS" if good else "FAIL"
                rows.append([f"{case.net} {case.level}", f"{case.channels}×{case.size}²", name, impl,
                             f"{fwd * 1e3:.3f}", f"{fb * 1e3:.3f}", f"{speedup:.2f}×",
                             "-" if peak is None else mib(peak), "-" if share is None else f"{share:.2f}", verdict])
    header = ["level", "C×size", "dtype", "impl", "fwd ms", "fwd+bwd ms", "fwd+bwd vs official", "peak MiB",
              "peak / official", f"target (≥{SPEEDUP:g}×, ≤{MEMORY_SHARE:g})"]
    return markdown_table(header, rows), targets


def backbones(setup: dict, device: torch.device, impls: Sequence[str]) -> tuple[str, list[bool]]:
    subject = impls[0]
    rows, targets = [], []
    for name in setup["models"]:
        torch.manual_seed(0)
        model = create_model(name).to(device)
        runs = [("inference", 1, size, torch.rand(1, 3, size, size, device=device), None)
                for size in setup["infer"]]
        runs += [("train step", batch, size, torch.rand(batch, 3, size, size, device=device),
                  torch.rand(batch, 3, size, size, device=device)) for batch, size in setup["train"]]
        for kind, batch, size, x, target in runs:
            for precision in ("fp32", "bf16-mixed"):
                measured = {}
                for impl in (subject, "reference"):
                    call = model_call(model, x, target, impl, precision != "fp32")
                    measured[impl] = (median_seconds(call, max(1, setup["repeats"] // 2), device),
                                      peak_bytes(call, device))
                speedup = measured["reference"][0] / measured[subject][0]
                verdict = "-"
                if kind == "train step":
                    targets.append(speedup >= STEP_SPEEDUP)
                    verdict = "PASS" if targets[-1] else "FAIL"
                peaks = ["-" if measured[i][1] is None else mib(measured[i][1]) for i in (subject, "reference")]
                rows.append([name, kind, f"{batch}×{size}²", precision, f"{measured[subject][0] * 1e3:.1f}",
                             f"{measured['reference'][0] * 1e3:.1f}", f"{speedup:.2f}×", *peaks, verdict])
        del model
    header = ["model", "run", "batch×size", "precision", f"{subject} ms", "official ms", "speed-up",
              f"{subject} peak MiB", "official peak MiB", f"target (train ≥{STEP_SPEEDUP:g}×)"]
    return markdown_table(header, rows), targets


def write_training_data(root: Path, size: int, count: int = 16) -> None:
    """Random noisy/clean pairs in the SIDD layout of ``configs/data/sidd.yaml`` (PNG crops, validation .mat)."""
    import cv2

    rng = np.random.default_rng(0)
    for kind in ("input_crops", "target_crops"):
        (root / "train" / "SIDD" / kind).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        clean = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        noisy = np.clip(clean + rng.normal(0, 10, clean.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "train" / "SIDD" / "input_crops" / f"{i:04d}.png"), noisy)
        cv2.imwrite(str(root / "train" / "SIDD" / "target_crops" / f"{i:04d}.png"), clean)
    blocks = rng.integers(0, 256, (1, 2, 32, 32, 3), dtype=np.uint8)
    (root / "test" / "SIDD").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "test" / "SIDD" / "ValidationNoisyBlocksSrgb.mat", {"ValidationNoisyBlocksSrgb": blocks})
    scipy.io.savemat(root / "test" / "SIDD" / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": blocks})


def train_throughput(setup: dict, device: torch.device) -> str:
    """images/s of a real ``train.py`` run of the SIDD experiment (logged by the Throughput callback). ``train.py``
    and ``configs/`` belong to a checkout, not to the installed package: without them the section says so."""
    if not (IMPORT_ROOT / "train.py").is_file() or not (IMPORT_ROOT / "configs").is_dir():
        return (f"not measured: no train.py and configs/ beside the kbnet package in {IMPORT_ROOT} (they come with "
                "a repository checkout, not with an installed package)")
    run = setup["train_run"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_training_data(root / "data", run["size"])
        size = run["size"]
        overrides = [
            "experiment=kbnet_s_sidd", f"model={run['model']}", f"paths.data_dir={root / 'data'}",
            f"paths.output_dir={root / 'run'}", "run_name=benchmark", "logger=csv", "global_batch_size=8",
            f"data.patch_size={size}", f"task.progressive.iters=[{run['steps']}]",
            f"task.progressive.patch_sizes=[{size}]", "task.progressive.batch_sizes=[8]",
            f"trainer.max_steps={run['steps']}", "trainer.log_every_n_steps=1",
            f"trainer.val_check_interval={run['steps']}", "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
            "~callbacks.model_summary", "~callbacks.val_images", "data.num_workers=2",
            f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", "trainer.devices=1",
            f"callbacks.throughput.window={max(1, run['steps'] // 2)}",
        ]
        env = {**os.environ, "PYTHONPATH": import_path(), "WANDB_MODE": "disabled"}
        result = subprocess.run([sys.executable, "train.py", *overrides], cwd=IMPORT_ROOT, env=env,
                                capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"train.py failed:\n{result.stderr[-3000:]}")
        rates = [float(row["train/images_per_sec"]) for path in (root / "run").rglob("metrics.csv")
                 for row in csv.DictReader(path.open()) if row.get("train/images_per_sec")]
    if not rates:
        raise RuntimeError("train.py logged no train/images_per_sec")
    return (f"train.py experiment=kbnet_s_sidd model={run['model']}, batch 8 of {size}² crops, {run['steps']} steps "
            f"on {device.type}: {rates[-1]:.1f} images/s (Throughput callback, last window)")


def launch_table(setup: dict) -> tuple[str, list[bool]]:
    batch, size = setup["launch"]
    rows, targets = [], []
    for name in setup["models"]:
        counts = {}
        for label, impl, slab in (("official formulation", "reference", None), ("torch, 64 MiB slabs", "torch", None),
                                  ("torch, 2 GiB slabs", "torch", "2048"), ("native (CPU)", "native", None),
                                  ("triton", "triton", None)):
            previous = os.environ.pop(SLAB_ENV, None)
            if slab is not None:
                os.environ[SLAB_ENV] = slab
            try:
                counts[label] = launches.count_training_step(name, impl, batch, size)
            finally:
                os.environ.pop(SLAB_ENV, None)
                if previous is not None:
                    os.environ[SLAB_ENV] = previous
        reference = counts["official formulation"].total
        for label, count in counts.items():
            verdict = "-"
            if label == "triton":
                targets.append(count.total < reference)
                verdict = f"< official: {'PASS' if targets[-1] else 'FAIL'}"
            elif label == "torch, 2 GiB slabs":
                targets.append(count.total <= TORCH_LAUNCH_RATIO * reference)
                verdict = f"≤ {TORCH_LAUNCH_RATIO:g}× official: {'PASS' if targets[-1] else 'FAIL'}"
            rows.append([name, label, f"{count.aten:,}", f"{count.triton:,}", f"{count.total:,}",
                         f"{count.total / reference:.2f}×", verdict])
    header = ["model", "KBA implementation", "ATen calls", "Triton launches", "total", "vs official", "target"]
    return (f"Batch {batch}, {size}², one training step (forward, L1, backward), counted on fake tensors:\n\n"
            + markdown_table(header, rows)), targets


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_parser("gpu", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and models, one repeat (smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-train-run", action="store_true", help="leave out the train.py throughput run")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    device = torch.device(args.device)
    impls = implementations(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"# KBNet GPU benchmark on {name}, torch {torch.__version__}, implementations {', '.join(impls)}\n")
    begin = time.perf_counter()
    agreement, agree = check_agreement(setup, args.quick, device, impls)
    print(f"## Agreement with the official formulation (float64), {'PASS' if agree else 'FAIL'}\n\n{agreement}\n")
    table, level_targets = kba_levels(setup, args.quick, device, impls)
    print(f"## KBA per level, batch {setup['level_batch']}, {setup['level_input']}² input\n\n{table}\n")
    table, step_targets = backbones(setup, device, impls)
    print(f"## Whole backbones, {impls[0]} against the official formulation\n\n{table}\n")
    if not args.skip_train_run:
        print(f"## Training throughput\n\n{train_throughput(setup, device)}\n")
    table, launch_targets = launch_table(setup)
    print(f"## Kernel launches per training step\n\n{table}\n")
    targets = level_targets + step_targets + launch_targets
    print(f"Targets: {sum(targets)} of {len(targets)} PASS; agreement {'PASS' if agree else 'FAIL'}; "
          f"{time.perf_counter() - begin:.0f} s")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
