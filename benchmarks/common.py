"""Shared measurement helpers of the benchmark scripts: timing, peak memory in isolated workers, Markdown tables.

Why workers: the process-wide resident set only tells the memory of one variant if nothing else ran before it in
the process and freed memory really goes back to the system. Each variant therefore runs in a fresh subprocess
with glibc told to serve every allocation of 64 KiB or more by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``) and to return
freed memory at once (``MALLOC_TRIM_THRESHOLD_``); Linux' peak-RSS counter (``VmHWM``) is reset right before the
measured call (``/proc/self/clear_refs``) after a warm-up call, so lazy one-time allocations are excluded.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
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


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The machine's measured rate on a large float32 matrix product: the practical compute ceiling."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    timing = time_calls({"mm": lambda: a @ b}, repeats)["mm"]
    return 2 * size**3 / timing.wall / 1e9


def _memory_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def peak_bytes(fn: Callable[[], object], warmup: Callable[[], object] | None = None) -> int:
    """Peak resident memory of one call above the resident memory before it (call inside a worker).

    ``warmup`` (default: ``fn`` itself) runs first so one-time costs (library loading, caches) are not counted; a
    smaller call of the same code spares a second run of a very large one."""
    (warmup or fn)()
    Path("/proc/self/clear_refs").write_text("5")
    before = _memory_status()["VmRSS"]
    fn()
    return max(0, _memory_status()["VmHWM"] - before)


def memory_supported() -> bool:
    return sys.platform.startswith("linux") and Path("/proc/self/clear_refs").exists()


def run_worker(module: str, payload: dict, threads: int) -> dict:
    """Run ``python -m <module> --worker <json>`` in a fresh process and return the JSON it prints last."""
    env = {**os.environ, **WORKER_ENV, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(payload)], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"benchmark worker {module} {payload} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b > 0 else "n/a"


def machine_line(threads: int, mm_gflops: float) -> str:
    return (f"torch {torch.__version__}, {threads} thread(s), {os.cpu_count()} CPU(s); float32 matmul: "
            f"{mm_gflops:.0f} GFLOP/s")
