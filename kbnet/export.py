"""``kbnet-export`` (also ``python -m kbnet.export``): a trained KBNet as ONNX, torch.export (.pt2) or safetensors.

The graph formats are traced from ``DeployModel``: the backbone with KBA in standard ATen operators
(``use_kba("decomposed")``), so the file runs without any kbnet code, and with the pad to the model's size
multiple and the crop back inside the graph, so any height and width work (batch, height and width are dynamic).
Every export verifies itself before it exists: the written file is loaded back (onnxruntime /
``torch.export.load`` / ``safetensors``), run on sizes other than the traced one (non-multiples of 8 and 16
included) and compared with the PyTorch model; a largest absolute difference above the tolerance (1e-4, fp32)
deletes it. Files are written to a temporary name in the target folder and renamed only after verification, so
nothing half-written or unverified is ever left under the requested name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kbnet.cli import user_errors
from kbnet.errors import UserError
from kbnet.inference.loading import LoadedModel, load_model, model_channels
from kbnet.models import KBNetS, WeightLoadError, list_models
from kbnet.models.padding import PadMode
from kbnet.ops import use_kba

FORMATS = ("onnx", "pt2", "safetensors")
OPSET = 18
TOLERANCE = 1e-4
VERIFY_SIZES = ((64, 64), (250, 333), (37, 29))
"""Verification sizes (H, W): a multiple of 16, the non-multiples 250×333 and 37×29 (the last one at batch 2)."""
METADATA_PREFIX = "kbnet."
"""Prefix of the metadata keys in ONNX ``metadata_props`` and the safetensors header."""


class ExportError(UserError):
    """An export that cannot be made or failed its verification; the message names the file and the reason."""


@dataclass(frozen=True)
class Layout:
    """How a backbone pads: to ``multiple`` with ``mode`` (KBNet_s: zeros to 2**levels, KBNet_l: reflect to 8, as
    their ``size_multiple`` and ``pad_mode`` say)."""

    multiple: int
    mode: PadMode

    @property
    def min_side_pt2(self) -> int:
        """Smallest side a .pt2 program accepts: torch.export assumes the deepest level is wider than one pixel."""
        return self.multiple + 1

    @property
    def min_side_onnx(self) -> int:
        """Smallest side of an ONNX graph: reflect padding needs a pad smaller than the side (KBNet_l: ≥ 5)."""
        return self.multiple // 2 + 1 if self.mode == "reflect" else 1


def layout_of(model: nn.Module) -> Layout:
    """The padding the backbone itself states (``size_multiple``, ``pad_mode``), to be written into the graph."""
    multiple, mode = getattr(model, "size_multiple", None), getattr(model, "pad_mode", None)
    if multiple is None or mode is None:
        raise ExportError(f"cannot export a {type(model).__name__}: kbnet-export takes KBNetS and KBNetL backbones "
                          "(a backbone that states its size_multiple and pad_mode)")
    return Layout(multiple, mode)


class DeployModel(nn.Module):
    """The backbone with its padding written so that a traced graph stays valid for every size.

    The eager backbones skip the pad when the size is already a multiple and crop with a view; traced, both would
    specialise the graph to the traced size. Here the padded side is ``ceil(side / m) · m`` (an expression the
    symbolic shapes reduce, so the backbone's own pad resolves to none), and the crop is an ``index_select`` (a
    new tensor whose layout does not depend on whether anything was cropped). Values are the backbone's exactly.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.layout = layout_of(net)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        m = self.layout.multiple
        padded = F.pad(image, (0, (w + m - 1) // m * m - w, 0, (h + m - 1) // m * m - h), mode=self.layout.mode)
        out = self.net(padded)
        rows = torch.arange(h, device=image.device)
        cols = torch.arange(w, device=image.device)
        return out.index_select(2, rows).index_select(3, cols)


def trace(net: nn.Module) -> torch.export.ExportedProgram:
    """``torch.export`` of ``DeployModel(net)`` with dynamic batch, height and width, KBA decomposed."""
    layout = layout_of(net)
    side = 3 * layout.multiple + 5
    example = torch.rand(2, model_channels(net), side, side + layout.multiple - 2)
    auto = torch.export.Dim.AUTO
    with use_kba("decomposed"), torch.no_grad():
        return torch.export.export(DeployModel(net).eval(), (example,), dynamic_shapes={"image": {0: auto, 2: auto,
                                                                                                   3: auto}})


def model_metadata(loaded: LoadedModel) -> dict[str, str]:
    """What the exported file says about its model: preset, the config that rebuilds it, channels, padding."""
    layout = layout_of(loaded.model)
    return {
        f"{METADATA_PREFIX}preset": loaded.name,
        f"{METADATA_PREFIX}config": json.dumps(loaded.config, sort_keys=True),
        f"{METADATA_PREFIX}arch": "KBNet_s" if isinstance(loaded.model, KBNetS) else "KBNet_l",
        f"{METADATA_PREFIX}channels": str(model_channels(loaded.model)),
        f"{METADATA_PREFIX}size_multiple": str(layout.multiple),
        f"{METADATA_PREFIX}min_side": str(layout.min_side_onnx),
        f"{METADATA_PREFIX}source": loaded.source,
    }


@dataclass
class Verification:
    """Largest absolute difference from the PyTorch model per check (``"B×H×W"`` input, or the tensors)."""

    differences: dict[str, float]

    @property
    def worst(self) -> float:
        return max(self.differences.values())

    def lines(self) -> list[str]:
        return [f"  {check}: max abs diff {d:.3g}" for check, d in self.differences.items()]


def verify(run: Callable[[torch.Tensor], torch.Tensor], net: nn.Module, sizes: Sequence[tuple[int, int]],
           min_side: int = 1) -> Verification:
    """Run ``run`` and the eager ``net`` on seeded random images of every size (the last one at batch 2)."""
    generator = torch.Generator().manual_seed(0)
    channels = model_channels(net)
    differences = {}
    small = [f"{h}x{w}" for h, w in sizes if min(h, w) < min_side]
    if small or not sizes:
        raise ExportError(f"verification sizes {small or '(none)'}: this export needs sides ≥ {min_side}")
    for index, (h, w) in enumerate(sizes):
        batch = 2 if index == len(sizes) - 1 else 1
        x = torch.rand(batch, channels, h, w, generator=generator)
        with torch.no_grad():
            expected = net(x)
            got = run(x)
        if got.shape != expected.shape:
            raise ExportError(f"the exported model returned shape {tuple(got.shape)} for an input of "
                              f"{tuple(x.shape)}; the PyTorch model returns {tuple(expected.shape)}")
        differences[f"{batch}×{h}×{w}"] = (got.float() - expected).abs().max().item()
    return Verification(differences)


def _write_onnx(net: nn.Module, program: torch.export.ExportedProgram, path: Path, metadata: dict[str, str]) -> None:
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=OPSET, verbose=False)
    model = onnx_program.model
    model.graph.inputs[0].name = "image"
    model.graph.outputs[0].name = "restored"
    model.metadata_props.update(metadata)
    onnx_program.save(path, external_data=False)


def _run_onnx(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    from kbnet.inference.onnx_model import OnnxModel

    return OnnxModel.load(path, providers=["CPUExecutionProvider"])


def _run_pt2(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.export.load(path).module()


def _write_safetensors(net: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path), metadata=metadata)


def _verify_safetensors(net: nn.Module, path: Path) -> Verification:
    """Every tensor read back must equal the model's bit for bit (a weights file has no arithmetic to verify)."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    state = net.state_dict()
    if set(saved) != set(state):
        raise ExportError(f"{path}: the written tensors differ from the model's: {sorted(set(saved) ^ set(state))}")
    worst = max((saved[k].float() - state[k].float()).abs().max().item() for k in state)
    return Verification({f"{len(state)} tensors read back": worst})


def output_format(output: Path, fmt: str | None) -> str:
    """The format asked for with ``--format``, else the one the file extension names."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        return fmt
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ExportError(f"{output}: cannot tell the format from the extension {output.suffix or '(none)'!r}; "
                          f"use .onnx, .pt2 or .safetensors, or --format")
    return suffix


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output (unless ``overwrite``), a folder, and a folder that cannot be written to."""
    if output.is_dir():
        raise ExportError(f"output {output} is a folder; give a file name such as {output / 'model.onnx'}")
    if output.exists() and not overwrite:
        raise ExportError(f"refusing to overwrite existing {output} (pass --overwrite)")
    folder = output.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create the output folder {folder}: {err.strerror or err}") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"output folder {folder} is not writable")


@contextlib.contextmanager
def staged(output: Path) -> Iterator[Path]:
    """A temporary file next to ``output``, renamed onto it when the block succeeds and removed when it fails."""
    fd, name = tempfile.mkstemp(prefix=f".{output.stem}.", suffix=f".tmp{output.suffix}", dir=output.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp's 0600 would make the export private
    try:
        yield tmp
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class ExportResult:
    path: Path
    format: str
    verification: Verification


def _check_requirements(fmt: str) -> None:
    """Fail before any tracing when a package the format needs is missing."""
    needed = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "safetensors": ("safetensors",)}.get(fmt, ())
    for package in needed:
        try:
            __import__(package)
        except ImportError as err:
            raise ExportError(f"exporting .{fmt} needs {package}, which is not installed: pip install -e '.[export]' "
                              f"(or pip install {package})") from err


def plan_outputs(outputs: Sequence[str | os.PathLike], fmt: str | None, overwrite: bool) -> list[tuple[Path, str]]:
    """(path, format) of every requested output, all checked before any work starts."""
    paths = [Path(p) for p in outputs]
    if not paths:
        raise ExportError("no output given")
    if fmt is not None and len(paths) > 1:
        raise ExportError("--format applies to a single output; with several outputs name the formats by extension")
    if len({p.resolve() for p in paths}) != len(paths):
        raise ExportError(f"the same output is given twice: {[str(p) for p in paths]}")
    planned = [(p, output_format(p, fmt)) for p in paths]
    for path, kind in planned:
        check_output(path, overwrite)
        _check_requirements(kind)
    return planned


def _export_one(net: nn.Module, fmt: str, output: Path, metadata: dict[str, str],
                program: Callable[[], torch.export.ExportedProgram], sizes: Sequence[tuple[int, int]],
                tolerance: float, log: Callable[[str], None]) -> ExportResult:
    layout = layout_of(net)
    with staged(output) as tmp:
        if fmt == "safetensors":
            _write_safetensors(net, tmp, metadata)
            result = _verify_safetensors(net, tmp)
        elif fmt == "onnx":
            log(f"converting to ONNX (opset {OPSET})")
            _write_onnx(net, program(), tmp, metadata)
            result = verify(_run_onnx(tmp), net, sizes, layout.min_side_onnx)
        else:
            torch.export.save(program(), tmp)
            result = verify(_run_pt2(tmp), net, sizes, layout.min_side_pt2)
        log(f"verification of {output.name} against the PyTorch model:")
        for line in result.lines():
            log(line)
        if not result.worst <= tolerance:
            raise ExportError(f"{output}: verification failed, max abs diff {result.worst:.3g} > {tolerance:g}; "
                              "nothing was written")
    log(f"wrote {output} ({fmt}, max abs diff {result.worst:.3g} ≤ {tolerance:g})")
    return ExportResult(output, fmt, result)


def export_model(loaded: LoadedModel, outputs: Sequence[str | os.PathLike], fmt: str | None = None,
                 overwrite: bool = False, sizes: Sequence[tuple[int, int]] = VERIFY_SIZES,
                 tolerance: float = TOLERANCE, log: Callable[[str], None] = print) -> list[ExportResult]:
    """Export ``loaded`` to every path of ``outputs`` (format from ``fmt`` or the extension), each verified; the
    graph formats share one trace. See the module docstring."""
    planned = plan_outputs(outputs, fmt, overwrite)
    net = loaded.model.float().eval()
    layout = layout_of(net)
    for path, kind in planned:
        min_side = {"onnx": layout.min_side_onnx, "pt2": layout.min_side_pt2}.get(kind, 1)
        if not sizes or any(min(size) < min_side for size in sizes):
            raise ExportError(f"{path}: verification sizes {list(sizes)}: a .{kind} of {loaded.name} needs sides "
                              f"≥ {min_side}")
    metadata = model_metadata(loaded)
    traced: list[torch.export.ExportedProgram] = []

    def program() -> torch.export.ExportedProgram:
        if not traced:
            log(f"tracing {loaded.name} with torch.export (dynamic batch, height and width, KBA decomposed)")
            traced.append(trace(net))
        return traced[0]

    return [_export_one(net, kind, path, metadata, program, sizes, tolerance, log) for path, kind in planned]


def export(checkpoint: str | os.PathLike, outputs: str | os.PathLike | Sequence[str | os.PathLike],
           preset: str | None = None, weights: str | None = None, fmt: str | None = None, overwrite: bool = False,
           sizes: Sequence[tuple[int, int]] = VERIFY_SIZES, tolerance: float = TOLERANCE,
           log: Callable[[str], None] = print) -> list[ExportResult]:
    """Export one of our checkpoints, or an official release file with its ``preset``, to one or more files, e.g.
    ``export("pretrained/sidd.pth", ["sidd.onnx", "sidd.pt2"], preset="kbnet_s_sidd")``."""
    outputs = [outputs] if isinstance(outputs, str | os.PathLike) else list(outputs)
    plan_outputs(outputs, fmt, overwrite)
    if preset is not None and preset not in list_models():
        raise ExportError(f"unknown preset {preset!r}; available: {', '.join(list_models())}")
    try:
        loaded = load_model(checkpoint, preset=preset, weights=weights)
    except (WeightLoadError, ValueError, FileNotFoundError) as err:
        message = " ".join(line.strip() for line in str(err).splitlines())
        raise ExportError(message if str(checkpoint) in message else f"{checkpoint}: {message}") from err
    return export_model(loaded, outputs, fmt, overwrite, sizes, tolerance, log)


def _size(value: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 250x333, got {value!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {value!r}")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kbnet-export",
        description="Export a KBNet checkpoint as ONNX (.onnx), a torch.export program (.pt2) or safetensors "
                    "weights (.safetensors), verified against the PyTorch model before the file is written.")
    parser.add_argument("checkpoint", type=Path, help="a checkpoint of this project or an official release file "
                                                      "(needs --model)")
    parser.add_argument("-o", "--output", type=Path, required=True, action="append",
                        help="the file to write (.onnx, .pt2, .safetensors); repeat it for several formats from one "
                             "trace")
    parser.add_argument("-m", "--model", metavar="PRESET",
                        help=f"preset of an official weights file ({', '.join(list_models())})")
    parser.add_argument("--weights", metavar="KEY", help="ema|net in project checkpoints; the wrapper key "
                                                         "(params, params_ema, model, net) in official files")
    parser.add_argument("--format", choices=FORMATS, help="format (default: from the output's extension)")
    defaults = " ".join(f"{h}x{w}" for h, w in VERIFY_SIZES)
    parser.add_argument("--verify-size", type=_size, action="append", metavar="HxW",
                        help=f"verification size, repeatable (default: {defaults})")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"largest accepted absolute difference (default {TOLERANCE:g})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def run(args: argparse.Namespace) -> list[ExportResult]:
    return export(args.checkpoint, args.output, preset=args.model, weights=args.weights, fmt=args.format,
                  overwrite=args.overwrite, sizes=args.verify_size or VERIFY_SIZES, tolerance=args.tolerance)


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns 0, or exits with status 2 and one ``error:`` line (``kbnet.cli``)."""
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
