"""``kbnet-restore`` (also ``python -m kbnet.restore``): restore your own images with a KBNet checkpoint.

Any size: an image that would not fit the memory budget is restored in overlapping, blended tiles. Gray, colour
and alpha: the alpha plane is kept as it is; a gray image for a colour model (or the reverse) is refused unless
``--convert-channels``. 8- and 16-bit PNG/JPEG/TIFF in and out (the output keeps the input's depth unless
``--bit-depth``). Optional ×8 self-ensemble, and a side-by-side comparison (input | restored | target) when a
ground-truth ``--target`` is given.

Everything that can be checked before restoring is checked first: unreadable checkpoints, missing inputs, empty
folders, output names that collide or equal an input, existing outputs (kept unless ``--overwrite``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kbnet.cli import user_errors
from kbnet.errors import UserError
from kbnet.imageio import IMAGE_SUFFIXES, Image, convert_channels, list_images, read_image, write_image
from kbnet.inference import Restorer, load_model, resolve_device
from kbnet.inference.loading import model_from_onnx
from kbnet.inference.onnx_model import ONNX_SUFFIX
from kbnet.inference.tiling import TileCallback
from kbnet.metrics import psnr
from kbnet.models import list_models

OUTPUT_FORMATS = ("same", "png", "tif", "tiff", "jpg", "jpeg")
COMPARE_SUFFIX = "_compare.png"


class RestoreError(UserError, ValueError):
    """A problem with the command line's files, reported before anything is written where possible."""


@dataclass(frozen=True)
class Job:
    """One input image, where its result goes, and its optional target and comparison image."""

    input: Path
    output: Path
    target: Path | None = None
    compare: Path | None = None


def expand_inputs(inputs: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Input files in command-line order (folders give their images in name order), and the folders given."""
    files: list[Path] = []
    folders: list[Path] = []
    for path in inputs:
        if path.is_dir():
            folders.append(path)
            files.extend(list_images(path))
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise RestoreError(f"{path}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
            files.append(path)
        else:
            raise RestoreError(f"input not found: {path}")
    return files, folders


def find_target(image: Path, target: Path, single: bool) -> Path:
    """The ground truth of ``image``: ``target`` itself for a single input file, else the same stem in a folder."""
    if target.is_file():
        if not single:
            raise RestoreError(f"--target {target} is a file, but several images are restored; pass a folder of "
                               "targets with the same file names")
        return target
    if not target.is_dir():
        raise RestoreError(f"target not found: {target}")
    matches = [p for p in list_images(target) if p.stem == image.stem]
    if len(matches) != 1:
        found = "no image" if not matches else f"{len(matches)} images"
        raise RestoreError(f"{image}: {found} named {image.stem}.* in the target folder {target}")
    return matches[0]


def plan_jobs(inputs: Sequence[Path], output_dir: Path, fmt: str = "same", target: Path | None = None,
              side_by_side: bool = False, overwrite: bool = False) -> list[Job]:
    """Every (input, output, target, comparison) path, checked for collisions before any work starts."""
    files, folders = expand_inputs(inputs)
    if not files:
        raise RestoreError("no input images given")
    if output_dir.exists() and not output_dir.is_dir():
        raise RestoreError(f"-o/--output {output_dir} is an existing file; give a folder for the results (it is "
                           "created if missing)")
    output_dir = output_dir.resolve()
    if any(folder.resolve() == output_dir for folder in folders):
        raise RestoreError(f"the output folder {output_dir} is also an input folder; choose another one so "
                           "results never mix with (or replace) the inputs")
    jobs = []
    for path in files:
        suffix = path.suffix if fmt == "same" else f".{fmt}"
        tgt = find_target(path, target, single=len(files) == 1) if target is not None else None
        compare = output_dir / f"{path.stem}{COMPARE_SUFFIX}" if tgt is not None or side_by_side else None
        jobs.append(Job(path, output_dir / f"{path.stem}{suffix}", tgt, compare))
    _check_outputs(jobs, overwrite)
    return jobs


def _check_outputs(jobs: Sequence[Job], overwrite: bool) -> None:
    protected = {p.resolve(): p for job in jobs for p in (job.input, job.target) if p is not None}
    written: dict[Path, Path] = {}
    for job in jobs:
        for out in (job.output, job.compare):
            if out is None:
                continue
            if out in protected:
                raise RestoreError(f"refusing to write {out}: it is an input or target file")
            if out in written:
                raise RestoreError(f"{written[out]} and {job.input} would both be written to {out}; restore them "
                                   "into separate folders")
            written[out] = job.input
    existing = [str(p) for p in written if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise RestoreError(f"refusing to overwrite existing output file(s): {shown} (pass --overwrite)")


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].float()


def to_pixels(tensor: torch.Tensor) -> np.ndarray:
    return tensor[0].clamp(0, 1).permute(1, 2, 0).numpy()


def model_input(pixels: np.ndarray, channels: int, path: Path, convert: bool) -> np.ndarray:
    """The pixels in the model's channel count, or an error when that needs a conversion nobody asked for."""
    have = pixels.shape[2]
    if have == channels:
        return pixels
    if not convert:
        kind = {1: "gray", 3: "colour"}
        raise RestoreError(f"{path}: is a {kind.get(have, have)} image ({have} channel(s)) but the model takes "
                           f"{channels}-channel ({kind.get(channels, channels)}) images; pass --convert-channels to "
                           "convert it (the result keeps the input's channel count)")
    return convert_channels(pixels, channels, source=path)


def side_by_side_image(panels: Sequence[np.ndarray]) -> np.ndarray:
    """Panels (H x W x 1 or 3, same size) next to each other, in colour, with a 4-pixel white gap."""
    rgb = [np.repeat(p, 3, axis=2) if p.shape[2] == 1 else p for p in panels]
    gap = np.ones((rgb[0].shape[0], 4, 3), dtype=np.float32)
    parts = [rgb[0]]
    for panel in rgb[1:]:
        parts += [gap, panel]
    return np.concatenate(parts, axis=1)


def restore_job(restorer: Restorer, job: Job, *, convert: bool, bit_depth: int | None, overwrite: bool,
                on_tile: TileCallback | None = None) -> str:
    """Restore one image and write its outputs; returns a one-line report. The target is checked first, so a
    mismatch writes nothing."""
    image = read_image(job.input)
    target = None if job.target is None else read_image(job.target).pixels
    if target is not None and target.shape != image.pixels.shape:
        raise RestoreError(f"size mismatch: target {job.target} is {_size(target)} but {job.input} is "
                           f"{_size(image.pixels)}; a target must match its input")
    pixels = model_input(image.pixels, restorer.channels, job.input, convert)
    tiles = 0

    def count_tiles(done: int, total: int) -> None:
        nonlocal tiles
        tiles = total
        if on_tile is not None:
            on_tile(done, total)

    restored = to_pixels(restorer(to_tensor(pixels), on_tile=count_tiles))
    restored = convert_channels(restored, image.pixels.shape[2], source=job.input)
    depth = bit_depth or (8 if image.bit_depth == 8 else 16)
    write_image(job.output, Image(restored, bit_depth=depth, alpha=image.alpha), bit_depth=depth, overwrite=overwrite)
    report = f"{job.input} -> {job.output}" + (f" ({tiles} tiles)" if tiles > 1 else "")
    panels = [np.clip(image.pixels, 0, 1), restored]
    if target is not None:
        before = psnr(panels[0].astype(np.float64), target.astype(np.float64))
        after = psnr(restored.astype(np.float64), target.astype(np.float64))
        report += f"  PSNR vs {job.target}: input {before:.2f} dB, restored {after:.2f} dB"
        panels.append(target)
    if job.compare is not None:
        write_image(job.compare, side_by_side_image(panels), bit_depth=8, overwrite=overwrite)
        report += f"  (side by side: {job.compare.name})"
    return report


def _size(pixels: np.ndarray) -> str:
    return f"{pixels.shape[1]}x{pixels.shape[0]} (WxH) with {pixels.shape[2]} channel(s)"


def _tile_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 0 (never tile) or a tile size, got {value!r}") from None
    if size < 0:
        raise argparse.ArgumentTypeError(f"tile size must be >= 0, got {size}")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kbnet-restore",
        description="Restore images with a KBNet checkpoint: files or folders in, restored images out (any size, "
                    "gray/colour/alpha, 8/16-bit PNG/JPEG/TIFF).")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files and/or folders of images")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                        help="folder for the results (created; never an input folder)")
    parser.add_argument("-c", "--checkpoint", type=Path, required=True,
                        help="a checkpoint of this project (rebuilds its own model), an official release file "
                             "(needs --model), a .safetensors file or an exported .onnx model (onnxruntime)")
    parser.add_argument("-m", "--model", choices=list_models(), metavar="PRESET",
                        help=f"model preset of an official weights file ({', '.join(list_models())}); with a "
                             "project checkpoint it is only checked against the one it holds")
    parser.add_argument("--weights", metavar="KEY",
                        help="which weights: 'ema' or 'net' in project checkpoints (default: EMA when the run kept "
                             "one); the wrapper key (params, params_ema, model, net) in official files")
    parser.add_argument("--target", type=Path, metavar="PATH",
                        help="ground truth: a file (one input) or a folder with the same file names; writes "
                             f"<name>{COMPARE_SUFFIX} (input | restored | target) and prints PSNR")
    parser.add_argument("--side-by-side", action="store_true",
                        help=f"write <name>{COMPARE_SUFFIX} (input | restored) even without a target")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="same",
                        help="output file format (default: the input's)")
    parser.add_argument("--bit-depth", type=int, choices=(8, 16),
                        help="output bit depth (default: the input's; JPEG is always 8)")
    parser.add_argument("--tile", type=_tile_arg, default="auto", metavar="auto|0|SIZE",
                        help="auto: tile only images that exceed the memory budget (default); 0: never tile; "
                             "SIZE: tiles of that side (rounded down to the model's size multiple)")
    parser.add_argument("--tile-overlap", type=int, default=64, metavar="N",
                        help="pixels shared by neighbouring tiles, blended (default 64)")
    parser.add_argument("--max-memory-gb", type=float, metavar="GB",
                        help="memory budget of the automatic tiling (default: 80%% of the free memory of the device)")
    parser.add_argument("--self-ensemble", action="store_true",
                        help="average the 8 flips/rotations (8x slower, usually a little better)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: bfloat16 autocast, on CUDA or a CPU with AVX512_BF16 (default fp32)")
    parser.add_argument("--bf16", action="store_const", const="bf16", dest="precision",
                        help="the same as --precision bf16")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the backbone (the first image of each size compiles, later ones run "
                             "faster); not for .onnx models")
    parser.add_argument("--convert-channels", action="store_true",
                        help="convert gray inputs for a colour model (and the reverse) instead of refusing them")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, only errors")
    return parser


def run(args: argparse.Namespace, console: Console) -> None:
    jobs = plan_jobs(args.inputs, args.output, args.format, args.target, args.side_by_side, args.overwrite)
    tile, note = args.tile, ""
    if args.checkpoint.suffix.lower() == ONNX_SUFFIX:
        if args.precision != "fp32" or args.compile:
            raise RestoreError(f"--precision bf16 and --compile apply to PyTorch models, not to the ONNX model "
                               f"{args.checkpoint}")
        loaded = model_from_onnx(args.checkpoint, preset=args.model, device=args.device)
        device = torch.device("cpu")  # onnxruntime takes host arrays; its provider decides where it runs
        if tile == "auto":  # the memory planner profiles PyTorch models only
            tile, note = None, " (ONNX: whole images; --tile N tiles large ones)"
    else:
        device = resolve_device(args.device)
        loaded = load_model(args.checkpoint, preset=args.model, weights=args.weights)
    budget = None if args.max_memory_gb is None else int(args.max_memory_gb * 2**30)
    restorer = Restorer(loaded.model, device=device, precision=args.precision, tile=tile,
                        tile_overlap=args.tile_overlap, self_ensemble=args.self_ensemble, max_memory_bytes=budget,
                        compile=args.compile)
    if not args.quiet:
        console.print(f"model: {loaded.source}; device {device}{note}", soft_wrap=True, highlight=False)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.quiet) as progress:
        images = progress.add_task("images", total=len(jobs))
        tiles = progress.add_task("tiles", total=1)

        def on_tile(done: int, total: int) -> None:
            progress.update(tiles, completed=done, total=total)

        for job in jobs:
            progress.update(tiles, description=f"  {job.input.name}", completed=0, total=1)
            report = restore_job(restorer, job, convert=args.convert_channels, bit_depth=args.bit_depth,
                                 overwrite=args.overwrite, on_tile=on_tile)
            progress.advance(images)
            if not args.quiet:
                progress.console.print(report, soft_wrap=True, highlight=False)


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns 0, or exits with status 2 and one ``error:`` line (``kbnet.cli``)."""
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        run(args, console)
    except MemoryError as err:
        raise RestoreError(f"{err}; restore in tiles (--tile 512) or allow more memory (--max-memory-gb)") from err
    return 0


if __name__ == "__main__":
    sys.exit(main())
