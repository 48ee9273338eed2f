"""Cut SIDD-Medium sRGB noisy/clean pairs into aligned 512x512 training crops (overlap 128).

    python data/prepare_sidd.py --src SIDD_Medium_Srgb/Data --dst data/train/SIDD

Each scene folder holds ``*NOISY_SRGB_*.PNG`` and ``*GT_SRGB_*.PNG`` files; a noisy file pairs with the file of
the same name with NOISY replaced by GT. Crops go to ``<dst>/input_crops`` and ``<dst>/target_crops`` under the
noisy file's stem plus a crop number, on a grid with stride 384 and a last crop flush with each border
(Restormer's ``generate_patches_sidd.py``). Images smaller than a crop are kept whole.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kbnet.data.prepare import grid_crops, prepare_output_dirs, run_parallel, save
from kbnet.imageio import is_image_file, read_image


def find_pairs(src: Path) -> list[tuple[Path, Path]]:
    """(noisy, clean) file pairs under ``src``; a file without its partner is an error."""
    if not src.is_dir():
        raise FileNotFoundError(f"SIDD source folder not found: {src} (expected SIDD_Medium_Srgb/Data)")
    files = sorted(p for p in src.rglob("*") if p.is_file() and is_image_file(p))
    noisy = [p for p in files if "NOISY" in p.name]
    clean = {p for p in files if "GT" in p.name}
    if not noisy:
        raise FileNotFoundError(f"no *NOISY*.PNG images under {src}")
    other = [str(p) for p in files if p not in clean and p not in set(noisy)]
    if other:
        raise ValueError(f"images that are neither NOISY nor GT under {src}: {', '.join(other)}")
    pairs = [(p, p.with_name(p.name.replace("NOISY", "GT"))) for p in noisy]
    missing = [str(gt) for _, gt in pairs if gt not in clean]
    unpaired = sorted(str(p) for p in clean - {gt for _, gt in pairs})
    if missing or unpaired:
        raise FileNotFoundError("unpaired SIDD files:\n" + "\n".join(
            [f"  missing clean image {m}" for m in missing] + [f"  clean image without noisy input {u}"
                                                                for u in unpaired]))
    return pairs


def crop_pair(pair: tuple[Path, Path], dst: Path, patch: int, stride: int) -> int:
    noisy_path, clean_path = pair
    noisy, clean = read_image(noisy_path), read_image(clean_path)
    if noisy.pixels.shape != clean.pixels.shape:
        raise ValueError(f"size mismatch: {noisy_path} {noisy.pixels.shape} vs {clean_path} {clean.pixels.shape}")
    h, w = noisy.pixels.shape[:2]
    boxes = grid_crops(h, w, patch, stride) if min(h, w) >= patch else [(0, 0)]
    height, width = (patch, patch) if min(h, w) >= patch else (h, w)
    for number, (top, left) in enumerate(boxes, start=1):
        name = f"{noisy_path.stem}_{number:03d}.png"
        for image, folder in ((noisy, "input_crops"), (clean, "target_crops")):
            save(dst / folder / name, image.pixels[top:top + height, left:left + width], image.bit_depth)
    return len(boxes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="SIDD_Medium_Srgb/Data (one folder per scene)")
    parser.add_argument("--dst", type=Path, required=True, help="output folder, e.g. data/train/SIDD")
    parser.add_argument("--patch", type=int, default=512, help="crop side in pixels")
    parser.add_argument("--overlap", type=int, default=128, help="overlap of neighbouring crops in pixels")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--overwrite", action="store_true", help="replace images already in the output folders")
    args = parser.parse_args(argv)
    pairs = find_pairs(args.src)
    prepare_output_dirs([args.dst / "input_crops", args.dst / "target_crops"], args.overwrite)
    work = partial(crop_pair, dst=args.dst, patch=args.patch, stride=args.patch - args.overlap)
    counts = run_parallel(work, pairs, args.workers)
    print(f"wrote {sum(counts)} crop pairs from {len(pairs)} image pairs to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
