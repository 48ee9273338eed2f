"""Arrange GoPro (and optionally HIDE) for motion deblurring as flat input/target folders.

    python data/prepare_gopro.py --gopro GOPRO_Large --hide HIDE_dataset --dst data

GoPro keeps its frames in ``{train,test}/<sequence>/{blur,sharp}/<frame>.png``; frame names repeat across
sequences, so the outputs are named ``<sequence>_<frame>.png``:
``<dst>/train/GoPro/{input,target}`` and ``<dst>/test/GoPro/{input,target}`` (whole frames, copied
byte for byte), plus ``<dst>/val/GoPro/{input_crops,target_crops}``, 256x256 centre crops of the test frames
for fast validation during training. HIDE keeps blurred test images in ``test/<subset>/`` and the sharp
ones under the same names in ``GT/``; they go to ``<dst>/test/HIDE/{input,target}``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kbnet.data.prepare import centre_crop, prepare_output_dirs, run_parallel, save
from kbnet.imageio import is_image_file, list_images, read_image


def gopro_pairs(split_dir: Path) -> list[tuple[Path, Path, str]]:
    """(blurred, sharp, output name) of every frame of every sequence in a GoPro split folder."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"GoPro split folder not found: {split_dir} (expected <sequence>/blur, sharp)")
    pairs = []
    for sequence in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        for blurred in list_images(sequence / "blur"):
            sharp = sequence / "sharp" / blurred.name
            if not sharp.is_file():
                raise FileNotFoundError(f"no sharp frame {sharp} for {blurred}")
            pairs.append((blurred, sharp, f"{sequence.name}_{blurred.name}"))
    if not pairs:
        raise FileNotFoundError(f"no sequences in {split_dir}")
    return pairs


def hide_pairs(root: Path) -> list[tuple[Path, Path, str]]:
    """(blurred, sharp, output name) of the HIDE test images."""
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"HIDE test folder not found: {test_dir} (expected test/<subset>/*.png, GT/)")
    pairs = []
    for blurred in sorted(p for p in test_dir.rglob("*") if p.is_file() and is_image_file(p)):
        sharp = root / "GT" / blurred.name
        if not sharp.is_file():
            raise FileNotFoundError(f"no sharp image {sharp} for {blurred}")
        pairs.append((blurred, sharp, blurred.name))
    if not pairs:
        raise FileNotFoundError(f"no images under {test_dir}")
    return pairs


def copy_pair(pair: tuple[Path, Path, str], out: Path) -> int:
    blurred, sharp, name = pair
    for source, folder in ((blurred, "input"), (sharp, "target")):
        target = out / folder / name
        if target.exists():
            raise FileExistsError(f"two sources map to {target}")
        shutil.copyfile(source, target)
    return 1


def crop_pair(pair: tuple[Path, Path, str], out: Path, size: int) -> int:
    blurred, sharp, name = pair
    for source, folder in ((blurred, "input_crops"), (sharp, "target_crops")):
        image = read_image(source)
        save(out / folder / Path(name).with_suffix(".png"), centre_crop(image.pixels, size), image.bit_depth)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gopro", type=Path, help="GOPRO_Large folder (train/, test/)")
    parser.add_argument("--hide", type=Path, help="HIDE_dataset folder (test/, GT/)")
    parser.add_argument("--dst", type=Path, required=True, help="data root, e.g. data")
    parser.add_argument("--val-size", type=int, default=256, help="side of the validation centre crops")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--overwrite", action="store_true", help="replace images already in the output folders")
    args = parser.parse_args(argv)
    if args.gopro is None and args.hide is None:
        parser.error("give --gopro, --hide or both")
    jobs = []
    if args.gopro is not None:
        train, test = gopro_pairs(args.gopro / "train"), gopro_pairs(args.gopro / "test")
        jobs += [("train/GoPro", ("input", "target"), partial(copy_pair, out=args.dst / "train/GoPro"), train),
                 ("test/GoPro", ("input", "target"), partial(copy_pair, out=args.dst / "test/GoPro"), test),
                 ("val/GoPro", ("input_crops", "target_crops"),
                  partial(crop_pair, out=args.dst / "val/GoPro", size=args.val_size), test)]
    if args.hide is not None:
        jobs.append(("test/HIDE", ("input", "target"), partial(copy_pair, out=args.dst / "test/HIDE"),
                     hide_pairs(args.hide)))
    prepare_output_dirs([args.dst / name / sub for name, subs, _, _ in jobs for sub in subs], args.overwrite)
    for name, _, job, pairs in jobs:
        print(f"{name}: wrote {sum(run_parallel(job, pairs, args.workers))} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
