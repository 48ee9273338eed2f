"""Build the DFWB clean training set for Gaussian denoising from DIV2K, Flickr2K, WED and BSD400.

    python data/prepare_dfwb.py --src DIV2K_train_HR Flickr2K_HR WaterlooED BSD400 --dst data/train/DFWB

Images whose both sides exceed 800 pixels are cut into 512x512 crops with stride 416 (overlap 96) and a last
crop flush with each border; smaller images are kept whole (Restormer's ``generate_patches_dfwb.py``).
Outputs are named ``<source folder>_<stem>[_<crop number>].png`` so equal file names in two sources never
collide.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kbnet.data.prepare import grid_crops, prepare_output_dirs, run_parallel, save
from kbnet.imageio import list_images, read_image


def crop_image(path: Path, dst: Path, patch: int, stride: int, min_side: int) -> int:
    image = read_image(path)
    h, w = image.pixels.shape[:2]
    prefix = f"{path.parent.name}_{path.stem}"
    if h <= min_side or w <= min_side:
        save(dst / f"{prefix}.png", image.pixels, image.bit_depth)
        return 1
    boxes = grid_crops(h, w, patch, stride)
    for number, (top, left) in enumerate(boxes, start=1):
        save(dst / f"{prefix}_{number:03d}.png", image.pixels[top:top + patch, left:left + patch],
             image.bit_depth)
    return len(boxes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, nargs="+", required=True, help="folders of clean images")
    parser.add_argument("--dst", type=Path, required=True, help="output folder, e.g. data/train/DFWB")
    parser.add_argument("--patch", type=int, default=512, help="crop side in pixels")
    parser.add_argument("--overlap", type=int, default=96, help="overlap of neighbouring crops in pixels")
    parser.add_argument("--min-side", type=int, default=800,
                        help="crop only images whose both sides exceed this; keep smaller ones whole")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--overwrite", action="store_true", help="replace images already in the output folder")
    args = parser.parse_args(argv)
    if args.min_side < args.patch:
        parser.error(f"--min-side ({args.min_side}) must be at least --patch ({args.patch})")
    names = [folder.name for folder in args.src]
    if len(set(names)) != len(names):
        parser.error(f"source folders must have distinct names (they prefix the outputs): {names}")
    files = [path for folder in args.src for path in list_images(folder)]
    prepare_output_dirs([args.dst], args.overwrite)
    work = partial(crop_image, dst=args.dst, patch=args.patch, stride=args.patch - args.overlap,
                   min_side=args.min_side)
    counts = run_parallel(work, files, args.workers)
    print(f"wrote {sum(counts)} images from {len(files)} sources to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
