"""glibc's default malloc against freed memory kept for reuse (``kbnet.allocator``), each in a fresh process.

    kbnet-bench allocator            # KBNet_s (SIDD) and KBNet_l: training steps, inference over changing sizes
    kbnet-bench allocator --quick    # tiny presets, tiny sizes: a smoke run

Measured per preset and setting: the median of training steps at 128², batch 2 (float32 and bf16 autocast; the
setting ``train.py`` runs with) after warm-up steps, and one inference pass over images of changing sizes (float32;
what ``kbnet-restore`` and ``evaluate.py`` would see, which is why they keep glibc's default), with the page
faults per step or pass and the process's peak resident memory.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from kbnet.allocator import ENV, retain_freed_memory, supported
from kbnet.benchmarks.command import benchmark_parser, positive_int
from kbnet.benchmarks.common import (
    machine_line,
    matmul_rates,
    memory_status,
    memory_supported,
    mib,
    ms,
    ratio,
    run_worker,
)
from kbnet.benchmarks.models import TRAIN_BATCH, build, inference, training_step
from kbnet.cli import user_errors
from kbnet.errors import UserError
from kbnet.markdown import markdown_table

FULL = {"models": ("kbnet_s_sidd", "kbnet_l"), "train": 128, "steps": (2, 3), "sizes": (256, 512, 384, 448, 320, 512)}
QUICK = {"models": ("kbnet_s_tiny", "kbnet_l_tiny"), "train": 16, "steps": (1, 2), "sizes": (16, 32, 24)}


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _measure(calls: Sequence[Callable[[], object]]) -> dict:
    """Wall seconds and page faults of each call, and the process's peak resident memory so far (VmHWM: what
    ``top`` would have shown at worst, warm-up and the runs before included)."""
    seconds, faults = [], []
    for call in calls:
        f0, t0 = _faults(), time.perf_counter()
        call()
        seconds.append(time.perf_counter() - t0)
        faults.append(_faults() - f0)
    return {"seconds": seconds, "faults": faults, "peak": memory_status()["VmHWM"]}


def worker(payload: dict) -> dict:
    """One preset, one allocator setting: training steps (float32, bf16) and the inference pass (a fresh process)."""
    torch.set_num_threads(payload["threads"])
    if payload["retain"] and not retain_freed_memory():
        raise RuntimeError("kbnet.allocator.retain_freed_memory() had no effect in the worker")
    model = build(payload["model"])
    warmup, steps = payload["steps"]
    result = {}
    for dtype in payload["dtypes"]:
        step = training_step(model.train(), "auto", payload["train"], bf16=dtype == "bf16")
        for _ in range(warmup):
            step()
        result[dtype] = _measure([step] * steps)
    model.eval()
    inference(model, "auto", payload["sizes"][0])()  # warm-up: one-time costs are not the allocator's
    result["sizes"] = _measure([inference(model, "auto", size) for size in payload["sizes"]])
    return result


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_parser("allocator", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny presets at tiny sizes (smoke run)")
    parser.add_argument("--models", nargs="+", default=None, help="presets (default: kbnet_s_sidd kbnet_l)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast training steps")
    args = parser.parse_args(argv)
    if not supported() or not memory_supported():
        raise UserError("kbnet-bench allocator compares glibc malloc settings: it needs Linux with glibc")
    setup = QUICK if args.quick else FULL
    dtypes = ["fp32"] + ["bf16"] * (not args.no_bf16)
    payload = {"threads": args.threads, "train": setup["train"], "steps": setup["steps"], "sizes": setup["sizes"],
               "dtypes": dtypes}
    rows = []
    for name in args.models or setup["models"]:
        runs = [run_worker("kbnet.benchmarks.allocator", {**payload, "model": name, "retain": retain}, args.threads,
                           env={ENV: str(int(retain))}) for retain in (False, True)]
        for task in [*dtypes, "sizes"]:
            default, retained = (run[task] for run in runs)
            if task == "sizes":
                label, shape = "inference, float32", ", ".join(f"{s}²" for s in setup["sizes"])
                t_default, t_retained = sum(default["seconds"]), sum(retained["seconds"])
                f_default, f_retained = sum(default["faults"]), sum(retained["faults"])
            else:
                label = f"train step, {'bf16 autocast' if task == 'bf16' else 'float32'}"
                shape = f"{setup['train']}²×{TRAIN_BATCH}"
                t_default, t_retained = (statistics.median(r["seconds"]) for r in (default, retained))
                f_default, f_retained = (int(statistics.median(r["faults"])) for r in (default, retained))
            rows.append([name, label, shape, ms(t_default), ms(t_retained), ratio(t_default, t_retained),
                         str(f_default), str(f_retained), mib(default["peak"]), mib(retained["peak"]),
                         ratio(retained["peak"], default["peak"])])

    warmup, steps = setup["steps"]
    print(f"Allocator settings, one fresh process each. {machine_line(args.threads, matmul_rates(1024))}. Train "
          f"step: median of {steps} after {warmup} warm-up; inference: the whole pass over the sizes (after one "
          "warm-up image); faults: minor page faults per step / per pass; peak: the process's peak resident "
          "memory after the task (VmHWM, since its start: torch and the tasks before included). × = default / "
          "retained (time), retained / default (peak).\n")
    print(markdown_table(["model", "task", "input", "default ms", "retained ms", "×", "default faults",
                          "retained faults", "default peak MiB", "retained peak MiB", "peak ×"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
