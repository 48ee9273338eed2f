"""Helpers of the dataset preparation scripts in ``data/``: crop grids, the DPDD sharpness filter and output
folders that are never overwritten by surprise."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from kbnet.imageio import IMAGE_SUFFIXES, Image, convert_channels, write_image

T = TypeVar("T")
R = TypeVar("R")


def crop_positions(length: int, patch: int, stride: int) -> list[int]:
    """Start offsets of ``patch``-long windows every ``stride`` pixels, plus one flush with the far border.

    This is the grid of the official patch scripts: ``arange(0, length - patch, stride)`` then
    ``length - patch``, so the last window ends exactly at the border (it may overlap its neighbour more).
    """
    if patch < 1 or stride < 1:
        raise ValueError(f"patch and stride must be positive, got patch={patch}, stride={stride}")
    if length < patch:
        raise ValueError(f"cannot place {patch}-pixel crops in {length} pixels")
    return [*range(0, length - patch, stride), length - patch]


def grid_crops(height: int, width: int, patch: int, stride: int) -> list[tuple[int, int]]:
    """(top, left) of every crop, row by row."""
    return [(top, left) for top in crop_positions(height, patch, stride)
            for left in crop_positions(width, patch, stride)]


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {w}x{h} image")
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size]


def sharpness(img: np.ndarray, ksize: int) -> float:
    """Sum of the Sobel gradient magnitude of an image (converted to gray) at one kernel size."""
    gray = convert_channels(img, 1)[:, :, 0].astype(np.float64)
    gx = cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=ksize)
    gy = cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=ksize)
    return float(np.sqrt(gx * gx + gy * gy).sum())


def sharpest(patches: Sequence[np.ndarray], drop_ratio: float = 0.3,
             ksizes: Sequence[int] = (3, 7, 11, 15)) -> list[bool]:
    """Which patches to keep when the ``drop_ratio`` least sharp of them are dropped (DPDD's filter).

    The score multiplies the Sobel-magnitude sums at the kernel sizes ``ksizes``, each normalized by its
    maximum over ``patches``; ``int(drop_ratio * len(patches))`` patches with the lowest scores are dropped.
    """
    if not 0 <= drop_ratio < 1:
        raise ValueError(f"drop_ratio must be in [0, 1), got {drop_ratio}")
    if not patches:
        return []
    scores = np.ones(len(patches))
    for ksize in ksizes:
        values = np.array([sharpness(p, ksize) for p in patches])
        scores *= values / max(values.max(), np.finfo(float).tiny)
    keep = np.ones(len(patches), dtype=bool)
    keep[np.argsort(scores, kind="stable")[: int(drop_ratio * len(patches))]] = False
    return keep.tolist()


def prepare_output_dirs(dirs: Iterable[Path], overwrite: bool) -> None:
    """Create output folders; a folder that already holds files is an error unless ``overwrite``, and then
    its image files are deleted first, so no stale crop of an earlier run is mixed in."""
    dirs = list(dirs)
    busy = [d for d in dirs if d.is_dir() and any(d.iterdir())]
    if busy and not overwrite:
        raise FileExistsError("output folder(s) already hold files: " + ", ".join(map(str, busy))
                              + " (pass --overwrite to replace their images)")
    for folder in dirs:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"output path exists and is not a folder: {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                path.unlink()


def save(path: Path, pixels: np.ndarray, bit_depth: int) -> None:
    """Write a PNG crop; two sources mapping to one name fail here instead of overwriting each other."""
    write_image(path, Image(pixels=pixels, bit_depth=bit_depth), bit_depth=bit_depth, overwrite=False)


def run_parallel(function: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``[function(item) for item in items]``, in ``workers`` processes when more than one."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        return [function(item) for item in items]
    with ProcessPoolExecutor(max_workers=min(workers, os.cpu_count() or 1)) as pool:
        return list(pool.map(function, items))
