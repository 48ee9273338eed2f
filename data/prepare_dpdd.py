"""Prepare DPDD for single-image defocus deblurring: sharp-only 512 training crops, 256 validation centre
crops and the test images, as 8-bit PNGs.

    python data/prepare_dpdd.py --src dd_dp_dataset_png --dst data

Reads ``<src>/{train_c,val_c,test_c}/{source,target}`` (the centre view and its all-in-focus target) and
writes ``<dst>/train/DPDD/{inputC_crops,target_crops}``, ``<dst>/val/DPDD/{inputC_crops,target_crops}`` and
``<dst>/test/DPDD/{inputC,target}``. Training images are cut into 512x512 crops with stride 204 and a last
crop flush with each border; per image, the 30% of crops whose target is least sharp (Sobel-magnitude
score at kernel sizes 3, 7, 11 and 15) are dropped, as DPDD's own patch script does. The 16-bit release is
converted to 8 bits: the single-image benchmark reads 8-bit images. The indoor/outdoor label files
(``indoor_labels.npy``, ``outdoor_labels.npy``) are not part of the DPDD release; copy them into
``<dst>/test/DPDD`` (see data/README.md).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kbnet.data.datasets import images_by_stem
from kbnet.data.prepare import centre_crop, grid_crops, prepare_output_dirs, run_parallel, save, sharpest
from kbnet.imageio import read_image

SPLITS = ("train_c", "val_c", "test_c")


def find_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(blurry, sharp) pairs of ``folder/source`` and ``folder/target``, matched by file name."""
    sources, targets = images_by_stem(folder / "source"), images_by_stem(folder / "target")
    if sources.keys() != targets.keys():
        odd = sorted(sources.keys() ^ targets.keys())
        raise FileNotFoundError(f"{folder}: source/target files without a partner: {', '.join(odd)}")
    return [(sources[stem], targets[stem]) for stem in sources]


def read_pair(pair: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray]:
    blurry, sharp = read_image(pair[0]).pixels, read_image(pair[1]).pixels
    if blurry.shape != sharp.shape:
        raise ValueError(f"size mismatch: {pair[0]} {blurry.shape} vs {pair[1]} {sharp.shape}")
    return blurry, sharp


def train_crops(pair: tuple[Path, Path], out: Path, patch: int, stride: int, drop: float, bits: int) -> int:
    blurry, sharp = read_pair(pair)
    boxes = grid_crops(*sharp.shape[:2], patch, stride)
    targets = [sharp[t:t + patch, left:left + patch] for t, left in boxes]
    kept = 0
    for number, ((top, left), target, keep) in enumerate(zip(boxes, targets, sharpest(targets, drop),
                                                                strict=True), start=1):
        if keep:
            name = f"{pair[0].stem}_{number:03d}.png"
            save(out / "inputC_crops" / name, blurry[top:top + patch, left:left + patch], bits)
            save(out / "target_crops" / name, target, bits)
            kept += 1
    return kept


def val_crop(pair: tuple[Path, Path], out: Path, size: int, bits: int) -> int:
    blurry, sharp = read_pair(pair)
    save(out / "inputC_crops" / f"{pair[0].stem}.png", centre_crop(blurry, size), bits)
    save(out / "target_crops" / f"{pair[0].stem}.png", centre_crop(sharp, size), bits)
    return 1


def test_copy(pair: tuple[Path, Path], out: Path, bits: int) -> int:
    blurry, sharp = read_pair(pair)
    save(out / "inputC" / f"{pair[0].stem}.png", blurry, bits)
    save(out / "target" / f"{pair[0].stem}.png", sharp, bits)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="DPDD release folder (dd_dp_dataset_png)")
    parser.add_argument("--dst", type=Path, required=True, help="data root, e.g. data")
    parser.add_argument("--patch", type=int, default=512, help="training crop side in pixels")
    parser.add_argument("--stride", type=int, default=204, help="training crop stride in pixels")
    parser.add_argument("--drop", type=float, default=0.3, help="fraction of least sharp crops dropped per image")
    parser.add_argument("--val-size", type=int, default=256, help="side of the validation centre crops")
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="bit depth of the outputs")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--overwrite", action="store_true", help="replace images already in the output folders")
    args = parser.parse_args(argv)
    pairs = {split: find_pairs(args.src / split) for split in SPLITS}
    train, val, test = args.dst / "train/DPDD", args.dst / "val/DPDD", args.dst / "test/DPDD"
    prepare_output_dirs([train / "inputC_crops", train / "target_crops", val / "inputC_crops",
                         val / "target_crops", test / "inputC", test / "target"], args.overwrite)
    jobs = {
        "train": partial(train_crops, out=train, patch=args.patch, stride=args.stride, drop=args.drop,
                         bits=args.bit_depth),
        "val": partial(val_crop, out=val, size=args.val_size, bits=args.bit_depth),
        "test": partial(test_copy, out=test, bits=args.bit_depth),
    }
    for (name, job), split in zip(jobs.items(), SPLITS, strict=True):
        count = sum(run_parallel(job, pairs[split], args.workers))
        print(f"{name}: wrote {count} pairs from {len(pairs[split])} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
