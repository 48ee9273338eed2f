"""Deployment speed: onnxruntime vs PyTorch eager vs ``torch.compile`` inference, and the choice of the exported KBA.

    kbnet-bench deploy          # three presets at 256², one image (slow: exports each preset)
    kbnet-bench deploy --kba    # the two decomposed KBA formulations under onnxruntime, per level
    kbnet-bench deploy --quick  # tiny presets at 32² (smoke run)

Models table: each preset (random weights) is exported with ``kbnet-export`` (decomposed KBA, verified) and run by
onnxruntime on the CPU; PyTorch runs it eagerly (default KBA, the fast native kernels) and compiled
(``torch.compile`` after one warm-up call). KBA table: ``kba_grouped_conv`` vs ``kba_unfold_matmul``, each
exported alone at the shape of every KBNet_s / KBNet_l level of a 256² image, timed in onnxruntime; the faster
one is the formulation the exporters use (``kbnet.ops.kba_decomposed``).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kbnet.benchmarks.command import benchmark_parser, positive_int
from kbnet.benchmarks.common import machine_line, matmul_rates, ms, ratio, time_calls
from kbnet.benchmarks.kba import KERNEL, cases, inputs
from kbnet.cli import user_errors
from kbnet.export import VERIFY_SIZES, export_model
from kbnet.inference.loading import LoadedModel
from kbnet.inference.onnx_model import OnnxModel, import_onnxruntime
from kbnet.markdown import markdown_table
from kbnet.models import create_model
from kbnet.ops.kba_decomposed import kba_grouped_conv, kba_unfold_matmul

FULL = {"models": ("kbnet_s_sidd", "kbnet_s", "kbnet_l"), "size": 256, "verify": VERIFY_SIZES}
QUICK = {"models": ("kbnet_s_tiny", "kbnet_l_tiny"), "size": 32, "verify": ((32, 32), (25, 33))}
FORMULATIONS = {"grouped conv": kba_grouped_conv, "unfold + matmul": kba_unfold_matmul}


class _KBA(nn.Module):
    """One KBA formulation with its bases as parameters, so the exported graph takes (x, att) like a level does."""

    def __init__(self, function: Callable[..., torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                 groups: int) -> None:
        super().__init__()
        self.function, self.groups = function, groups
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        return self.function(x, att, self.weight, self.bias, KERNEL, self.groups)


def _session(module: nn.Module, args: tuple[torch.Tensor, ...], folder: Path, name: str, threads: int):
    ort = import_onnxruntime()
    path = folder / f"{name}.onnx"
    torch.onnx.export(module, args, dynamo=True, opset_version=18, verbose=False).save(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kba_rows(quick: bool, repeats: int, threads: int, folder: Path) -> list[list[object]]:
    rows = []
    for case in [c for c in cases(quick) if c.batch == 1 and c.input_size == (32 if quick else 256)]:
        x, att, w, b = (t.detach() for t in inputs(case, requires_grad=False))
        feeds = {}
        calls = {}
        for label, function in FORMULATIONS.items():
            session = _session(_KBA(function, w, b, case.groups).eval(), (x, att), folder,
                               f"{case.net}_{case.level.replace('/', '_')}_{label[:4]}", threads)
            names = [i.name for i in session.get_inputs()]
            feeds[label] = dict(zip(names, (x.numpy(), att.numpy()), strict=True))
            calls[label] = (lambda s=session, f=feeds[label]: s.run(None, f))
        outs = [np.asarray(call()[0]) for call in calls.values()]
        timing = time_calls(calls, repeats)
        conv, unfold = timing["grouped conv"].wall, timing["unfold + matmul"].wall
        rows.append([case.net, case.level, f"{case.channels}/{case.group_channels}", f"{case.size}²", ms(conv),
                     ms(unfold), ratio(unfold, conv), f"{np.abs(outs[0] - outs[1]).max():.1e}"])
    return rows


def model_rows(models: Sequence[str], size: int, repeats: int, threads: int, folder: Path,
               sizes: Sequence[tuple[int, int]], verification: list[str]) -> list[list[object]]:
    """Timing rows; each export's verification (max abs diff per size) is appended to ``verification``."""
    rows = []
    for name in models:
        torch.manual_seed(0)
        net = create_model(name).eval()
        loaded = LoadedModel(net, name, f"{name} (random weights)", {"_target_": "kbnet.models.create_model",
                                                                        "name": name})
        path = folder / f"{name}.onnx"
        (result,) = export_model(loaded, [path], sizes=sizes, log=lambda _: None)
        verification.append(f"{name}: " + ", ".join(f"{check} {d:.2g}"
                                                     for check, d in result.verification.differences.items()))
        ort_model = OnnxModel.load(path, threads=threads)
        compiled = torch.compile(net, dynamic=False)  # static: Inductor fails on dynamic KBNet shapes
        x = torch.rand(1, 3, size, size)

        def eager(x=x, net=net) -> None:
            with torch.no_grad():
                net(x)

        def comp(x=x, compiled=compiled) -> None:
            with torch.no_grad():
                compiled(x)

        def onnx(x=x, model=ort_model) -> None:
            model(x)

        with torch.no_grad():
            difference = (compiled(x) - net(x)).abs().max().item()
        timing = time_calls({"eager": eager, "compiled": comp, "onnxruntime": onnx}, repeats)
        e, c, o = (timing[k].wall for k in ("eager", "compiled", "onnxruntime"))
        rows.append([name, f"{size}²×1", ms(e), ms(c), ms(o), ratio(e, c), ratio(e, o), f"{difference:.1e}"])
        del net, compiled, ort_model
    return rows


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_parser("deploy", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny presets / level shapes at 32², one repeat")
    parser.add_argument("--kba", action="store_true", help="only the KBA formulation table")
    parser.add_argument("--models", nargs="+", default=None, help="presets (default: kbnet_s_sidd kbnet_s kbnet_l)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed runs per variant (default 3; quick 1)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                        help="torch / onnxruntime threads")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    rates = matmul_rates(1024 if args.quick else 2048)
    ort = import_onnxruntime()
    header = (f"{machine_line(args.threads, rates)}; onnxruntime {ort.__version__} (CPUExecutionProvider, "
              f"{args.threads} threads). Times: median of {repeats} wall-clock runs, variants interleaved.")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.kba:
            print(f"Exported KBA (32 bases, 3×3), float32, batch 1. {header} × = unfold + matmul / grouped conv.\n")
            print(markdown_table(["net", "level", "C/gc", "H×W", "grouped conv ms", "unfold + matmul ms", "×",
                                  "max |Δ|"], kba_rows(args.quick, repeats, args.threads, folder)))
            return 0
        print(f"Inference, float32, one image. {header} Eager: default KBA; compiled: torch.compile after a warm-up "
              f"call; onnxruntime: the verified kbnet-export file. × = eager / variant.\n")
        verification: list[str] = []
        rows = model_rows(args.models or setup["models"], setup["size"], repeats, args.threads, folder,
                          setup["verify"], verification)
        print(markdown_table(["model", "input", "eager ms", "compiled ms", "onnxruntime ms", "compiled ×",
                              "onnxruntime ×", "compiled max |Δ|"], rows))
        print("\nONNX export verification (B×H×W: max abs diff vs PyTorch eager): " + "; ".join(verification))
    return 0


if __name__ == "__main__":
    sys.exit(main())
