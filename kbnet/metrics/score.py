"""Score a folder of restored images against ground truth, as the official MATLAB ``evaluate_PSNR_SSIM.m``.

The MATLAB script reads 8-bit results and targets, optionally takes the ``rgb2ycbcr`` Y channel (rounded to
uint8), and averages per-image PSNR and SSIM (Gaussian 11x11, valid region). This does the same in Python,
with exact uint8 values, and refuses anything that would make the mean silently cover a different set of
images.

Pairing:

* ``name`` (default): a result matches the target with the same file stem, or the target whose stem followed
  by ``-`` begins the result's stem (``rain-12-kbnet_l.png`` matches ``rain-12.jpg``; the longest such target
  stem wins, so ``1-x.png`` never matches ``10.png``). Every result and every target must be paired exactly
  once.
* ``sorted``: the i-th result in sorted file-name order with the i-th target, as MATLAB's ``dir()`` lists them
  (MATLAB's script lists ``*.jpg`` then ``*.png``; here all image files are sorted together by name).

Usage: ``python -m kbnet.metrics.score RESULTS TARGETS [--y-channel] [--crop-border N] [--pairing name|sorted]
[--out PREFIX] [--overwrite]``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kbnet.cli import user_errors
from kbnet.errors import ConfigError, DataError
from kbnet.imageio import ImageReadError, list_images, read_image, to_integer
from kbnet.metrics.aggregate import MetricTable, check_can_write, report_paths
from kbnet.metrics.exact import psnr, ssim

PAIRINGS = ("name", "sorted")


def read_uint8(path: Path) -> np.ndarray:
    """Exact 8-bit pixels of an image file as HxWxC uint8 (RGB order; an alpha plane is ignored, as MATLAB's
    ``imread`` returns it separately)."""
    image = read_image(path)
    if image.bit_depth != 8:
        raise ImageReadError(f"{path}: is a {image.bit_depth}-bit image; scoring follows the MATLAB protocol "
                             "on 8-bit images only")
    return to_integer(image.pixels, 8)


def _list_unmatched(kind: str, paths: Sequence[Path]) -> str:
    return f"{len(paths)} {kind} without a partner: " + ", ".join(p.name for p in paths)


def pair_by_name(results: Sequence[Path], targets: Sequence[Path]) -> list[tuple[Path, Path]]:
    """Pair by stem: the same stem, or the longest target stem plus ``-`` that begins the result's stem."""
    by_stem: dict[str, Path] = {}
    for t in targets:
        if t.stem in by_stem:
            raise DataError(f"two targets share the stem {t.stem!r}: {by_stem[t.stem].name} and {t.name}; "
                            "pair them with --pairing sorted or remove one")
        by_stem[t.stem] = t
    pairs: list[tuple[Path, Path]] = []
    claimed: dict[str, Path] = {}
    unmatched_results: list[Path] = []
    for r in results:
        stem = r.stem
        if stem in by_stem:
            match = stem
        else:
            candidates = [s for s in by_stem if stem.startswith(s + "-")]
            match = max(candidates, key=len) if candidates else None
        if match is None:
            unmatched_results.append(r)
            continue
        if match in claimed:
            raise DataError(f"results {claimed[match].name} and {r.name} both match target "
                            f"{by_stem[match].name}")
        claimed[match] = r
        pairs.append((r, by_stem[match]))
    unmatched_targets = [t for s, t in by_stem.items() if s not in claimed]
    problems = []
    if unmatched_results:
        problems.append(_list_unmatched("result(s)", unmatched_results))
    if unmatched_targets:
        problems.append(_list_unmatched("target(s)", unmatched_targets))
    if problems:
        raise DataError("unmatched files when pairing by name; " + "; ".join(problems))
    return pairs


def pair_sorted(results: Sequence[Path], targets: Sequence[Path]) -> list[tuple[Path, Path]]:
    """Pair the i-th result with the i-th target in sorted name order; the counts must agree."""
    results = sorted(results, key=lambda p: p.name)
    targets = sorted(targets, key=lambda p: p.name)
    if len(results) != len(targets):
        extra_kind, extra = (("result(s)", results[len(targets):]) if len(results) > len(targets)
                             else ("target(s)", targets[len(results):]))
        raise DataError(f"unmatched files when pairing in sorted order: {len(results)} results vs "
                        f"{len(targets)} targets; {_list_unmatched(extra_kind, extra)}")
    return list(zip(results, targets, strict=True))


def score_folders(results_dir: str | Path, targets_dir: str | Path, *, y_channel: bool, crop_border: int = 0,
                  pairing: str = "name") -> MetricTable:
    """PSNR and SSIM of every result against its target on exact uint8 pixels; rows plus ``.means()``."""
    if pairing not in PAIRINGS:
        raise ConfigError(f"pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    results = list_images(results_dir)
    targets = list_images(targets_dir)
    pairs = pair_by_name(results, targets) if pairing == "name" else pair_sorted(results, targets)
    table = MetricTable(metrics=("psnr", "ssim"), labels=("result", "target"), meta={
        "results_dir": str(results_dir), "targets_dir": str(targets_dir), "y_channel": y_channel,
        "crop_border": crop_border, "pairing": pairing})
    for result_path, target_path in pairs:
        pred, gt = read_uint8(result_path), read_uint8(target_path)
        if pred.shape != gt.shape:
            raise DataError(f"size mismatch: result {result_path} is {_size(pred)} but target {target_path} "
                            f"is {_size(gt)}")
        try:
            values = {"psnr": psnr(pred, gt, crop_border=crop_border, y_channel=y_channel),
                      "ssim": ssim(pred, gt, crop_border=crop_border, y_channel=y_channel)}
        except ValueError as err:
            raise DataError(f"cannot score {result_path} against {target_path}: {err}") from err
        table.add(result=result_path.name, target=target_path.name, **values)
    return table


def _size(img: np.ndarray) -> str:
    return f"{img.shape[1]}x{img.shape[0]} (WxH) with {img.shape[2]} channel(s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kbnet-score",
        description="PSNR/SSIM of restored images against ground truth, as the official MATLAB "
                    "evaluate_PSNR_SSIM.m computes them (exact uint8, MATLAB rgb2ycbcr Y, valid-region "
                    "SSIM).")
    parser.add_argument("results", type=Path, help="folder of restored images (8-bit)")
    parser.add_argument("targets", type=Path, help="folder of ground-truth images (8-bit)")
    parser.add_argument("--y-channel", action="store_true",
                        help="compare the MATLAB rgb2ycbcr Y channel (deraining protocol)")
    parser.add_argument("--crop-border", type=int, default=0, metavar="N",
                        help="pixels removed from every side before scoring (default 0)")
    parser.add_argument("--pairing", choices=PAIRINGS, default="name",
                        help="name: by file stem (a result may add '-suffix'); sorted: by sorted order, as "
                             "MATLAB's dir() (default: name)")
    parser.add_argument("--out", type=Path, metavar="PREFIX",
                        help="write PREFIX.csv, PREFIX.json and PREFIX.md (a .csv/.json/.md suffix is "
                             "dropped)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing report files")
    return parser


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``kbnet-score``); returns 0, or exits with status 2 and one ``error:`` line."""
    args = build_parser().parse_args(argv)
    if args.out is not None:
        check_can_write(report_paths(args.out), args.overwrite)
    table = score_folders(args.results, args.targets, y_channel=args.y_channel,
                          crop_border=args.crop_border, pairing=args.pairing)
    written = table.write_reports(args.out, overwrite=args.overwrite) if args.out is not None else []
    channel = "Y (MATLAB rgb2ycbcr)" if args.y_channel else "RGB"
    print(f"{args.results} vs {args.targets}: {channel}, crop_border={args.crop_border}, "
          f"pairing={args.pairing}")
    print(table.render())
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
