"""Shared measurement helpers of the benchmarks: timing, peak memory in isolated workers, the shared options.

Why workers: the process-wide resident set only tells the memory of one variant if nothing else ran before it in
the process and freed memory really goes back to the system. Each variant therefore runs in a fresh subprocess
with glibc told to serve every allocation of 64 KiB or more by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``) and to return
freed memory at once (``MALLOC_TRIM_THRESHOLD_``); Linux' peak-RSS counter (``VmHWM``) is reset right before the
measured call (``/proc/self/clear_refs``) after a warm-up call, so lazy one-time allocations are excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kbnet.benchmarks.command import positive_int
from kbnet.errors import UserError
from kbnet.ops import IMPLEMENTATIONS, native

IMPORT_ROOT = Path(__file__).resolve().parents[2]
"""The folder this ``kbnet`` is imported from (a checkout or site-packages), so the workers run the same code."""
MEMORY_METHOD = ("peak RSS above the RSS before the call (Linux VmHWM reset through /proc/self/clear_refs), one fresh "
                 "subprocess per variant, glibc mmap threshold 64 KiB so freed memory is returned, after one warm-up "
                 "call")
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


@dataclass(frozen=True)
class Timing:
    """Median wall-clock and CPU (all threads of this process) seconds of the measured calls."""

    wall: float
    cpu: float


def time_calls(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time several variants of one computation, interleaved round by round so that they share the machine's noise."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: Timing(statistics.median(s[0] for s in runs), statistics.median(s[1] for s in runs))
            for name, runs in samples.items()}


MATMUL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BF16_MATMUL_FEATURES = ("AVX512_BF16", "AMX-BF16")
"""The instruction sets oneDNN runs a bf16 matrix product on; without them it is emulated at a few GFLOP/s, so a
2048² product takes tens of seconds and its rate says nothing about the machine."""


def matmul_rates(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a large matrix product per dtype (float32, and bfloat16 where the CPU has bf16 instructions),
    interleaved: the compute ceiling of each dtype."""
    bf16 = any(isa in cpu_instruction_sets() for isa in BF16_MATMUL_FEATURES)
    pairs = {name: (torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype))
             for name, dtype in MATMUL_DTYPES.items() if bf16 or dtype != torch.bfloat16}
    timing = time_calls({name: (lambda a=a, b=b: a @ b) for name, (a, b) in pairs.items()}, repeats)
    return {name: 2 * size**3 / t.wall / 1e9 for name, t in timing.items()}


CPU_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512_BF16", "amx_tile": "AMX",
                "amx_bf16": "AMX-BF16"}


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_instruction_sets() -> list[str]:
    """The vector/matrix instruction sets of this CPU that matter here (from /proc/cpuinfo)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [label for flag, label in CPU_FEATURES.items() if flag in flags]


def bf16_kernels() -> bool:
    """Whether KBA has bf16 kernels on this machine (else bf16 autocast computes KBA in float32)."""
    return torch.bfloat16 in native.native_dtypes()


def check_level_size(size: int) -> None:
    """Refuse an input side the backbones' levels cannot be taken at: the deepest level is 1/16 of it."""
    if size < 16 or size % 16:
        raise UserError(f"--size must be a multiple of 16 (the deepest level is 1/16 of it), got {size}")


def floor_seconds(flops: float, gflops: float) -> float:
    """The time ``flops`` would take at a rate of ``gflops``: the floor of a run at the matmul rate."""
    return flops / (gflops * 1e9)


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f} %" if whole > 0 else "n/a"


def memory_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def peak_bytes(fn: Callable[[], object], warmup: Callable[[], object] | None = None) -> int:
    """Peak resident memory of one call above the resident memory before it (call inside a worker).

    ``warmup`` (default: ``fn`` itself) runs first so one-time costs (library loading, caches) are not counted; a
    smaller call of the same code spares a second run of a very large one."""
    (warmup or fn)()
    Path("/proc/self/clear_refs").write_text("5")
    before = memory_status()["VmRSS"]
    fn()
    return max(0, memory_status()["VmHWM"] - before)


def memory_supported() -> bool:
    return sys.platform.startswith("linux") and Path("/proc/self/clear_refs").exists()


def import_path() -> str:
    """``PYTHONPATH`` for a child process: ``IMPORT_ROOT`` first, then what this process was given."""
    given = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    return os.pathsep.join(dict.fromkeys([str(IMPORT_ROOT), *given]))


def run_worker(module: str, payload: dict, threads: int, env: dict[str, str] | None = None) -> dict:
    """Run ``worker(payload)`` of the benchmark ``module`` in a fresh process (``kbnet.benchmarks.worker``) and
    return its result. ``env`` replaces the glibc settings of the memory measurements (``WORKER_ENV``)."""
    env = {**os.environ, **(WORKER_ENV if env is None else env), "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": import_path()}
    command = [sys.executable, "-m", "kbnet.benchmarks.worker", module, json.dumps(payload)]
    result = subprocess.run(command, cwd=IMPORT_ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"benchmark worker {module} {payload} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Comparison:
    """What a run that times KBA implementations against each other measures (``kba``, ``models``)."""

    impls: list[str]
    """The subject first, the baseline last."""
    repeats: int
    memory: bool
    """Peak memory in worker processes (where Linux can measure it)."""
    bf16_off: str | None
    """Why the subject's bf16 autocast variant is not measured; None when it is."""

    @property
    def bf16(self) -> bool:
        return self.bf16_off is None

    def bf16_note(self, measured: str) -> str:
        """The header's bf16 sentence: ``measured`` describes the variant when it runs."""
        return f"bf16: {measured if self.bf16 else self.bf16_off}"


def add_comparison_options(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The options of a ``Comparison`` (read back by ``comparison``); ``repeats`` is the default of a full run (a
    ``--quick`` run repeats once)."""
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help=f"timed runs per variant (default {repeats}; quick 1)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--impls", default="auto,reference",
                        help=f"comma-separated KBA implementations, subject first, baseline last; of {IMPLEMENTATIONS}")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory workers")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast variant of the subject")


def comparison(parser: argparse.ArgumentParser, args: argparse.Namespace, repeats: int) -> Comparison:
    """The ``Comparison`` the parsed options ask for; a bad ``--impls`` exits through ``parser.error``."""
    impls = args.impls.split(",")
    if len(impls) < 2 or any(i not in IMPLEMENTATIONS for i in impls):
        parser.error(f"--impls needs at least two of {IMPLEMENTATIONS}, got {args.impls!r}")
    bf16_off = ("not measured" if args.no_bf16 else
                None if bf16_kernels() else "not measured (no bf16 KBA kernels on this CPU: no AVX512_BF16)")
    return Comparison(impls, args.repeats or (1 if args.quick else repeats),
                      not args.no_memory and memory_supported(), bf16_off)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b > 0 else "n/a"


def machine_line(threads: int, rates: dict[str, float]) -> str:
    """CPU, its instruction sets, the KBA kernels' instruction sets and the matmul rates of the run."""
    kernels = ", ".join(native.instruction_sets()) or f"unavailable: {native.unavailable_reason()}"
    mm = ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items())
    if "bfloat16" not in rates:
        mm += ", bfloat16 not measured (no bf16 instructions: emulated)"
    return (f"{cpu_model()} ({', '.join(cpu_instruction_sets()) or 'no AVX2'}; KBA kernels: {kernels}), torch "
            f"{torch.__version__}, {threads} thread(s), {os.cpu_count()} CPU(s); matmul GFLOP/s: {mm}")
