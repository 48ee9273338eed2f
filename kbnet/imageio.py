"""Image files in and out: 8/16-bit PNG, JPEG and TIFF, gray, colour and alpha.

One place decides how pixels become tensors so that training, evaluation and the restore CLI agree: RGB channel
order, float32 in [0, 1], and the bit depth remembered so a 16-bit input can be written back as 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kbnet.errors import ConfigError, DataError, ExistingFileError, MissingFileError
from kbnet.rundir import atomic_writer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


class ImageReadError(DataError):
    """An image file that cannot be used, with the path and the reason in the message."""


@dataclass
class Image:
    """Pixels as float32 HxWxC in [0, 1] (RGB order, C = 1 or 3), an optional alpha plane and the source bit depth."""

    pixels: np.ndarray
    bit_depth: int = 8
    alpha: np.ndarray | None = None


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder in sorted name order; an empty or missing folder is an error, never an empty list."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise MissingFileError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {folder}")
    return files


def read_image(path: str | Path, channels: int | None = None) -> Image:
    """Read an image file; ``channels`` = 1 or 3 converts gray/colour (alpha is kept apart, never blended)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ImageReadError(f"cannot decode image file {path} (corrupt or unsupported format)")
    if raw.dtype == np.uint8:
        bit_depth, scale = 8, 255.0
    elif raw.dtype == np.uint16:
        bit_depth, scale = 16, 65535.0
    elif raw.dtype in (np.float32, np.float64):
        bit_depth, scale = 32, 1.0
    else:
        raise ImageReadError(f"{path}: unsupported pixel type {raw.dtype} (expected 8- or 16-bit integers or float)")
    img = raw.astype(np.float32) / scale
    if img.ndim == 2:
        img = img[:, :, None]
    alpha = None
    if img.shape[2] == 4:
        alpha = img[:, :, 3:4].copy()
        img = img[:, :, :3]
    elif img.shape[2] == 2:
        alpha = img[:, :, 1:2].copy()
        img = img[:, :, :1]
    if img.shape[2] == 3:
        img = img[:, :, ::-1]
    if channels == 1 and img.shape[2] == 3 and bit_depth != 32:
        img = _decode_gray(path, scale)
    img = np.ascontiguousarray(img)
    if channels is not None:
        img = convert_channels(img, channels, source=path)
    return Image(pixels=img, bit_depth=bit_depth, alpha=alpha)


def _decode_gray(path: Path, scale: float) -> np.ndarray:
    """Colour file read as gray by OpenCV's own integer conversion, as the official gray benchmarks
    (``cv2.imread(..., IMREAD_GRAYSCALE)``) do: float luma would differ from their 8-bit values."""
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if gray is None:
        raise ImageReadError(f"cannot decode image file {path} as gray")
    return (gray.astype(np.float32) / scale)[:, :, None]


def convert_channels(img: np.ndarray, channels: int, source: str | Path = "image") -> np.ndarray:
    """Gray <-> RGB for HxWxC arrays; gray uses ITU-R BT.601 luma, as OpenCV's BGR2GRAY does."""
    have = img.shape[2]
    if have == channels:
        return img
    if have == 3 and channels == 1:
        gray = img[:, :, 0] * 0.299 + img[:, :, 1] * 0.587 + img[:, :, 2] * 0.114
        return gray[:, :, None].astype(img.dtype)
    if have == 1 and channels == 3:
        return np.repeat(img, 3, axis=2)
    raise ImageReadError(f"{source}: has {have} channels, cannot convert to {channels}")


def to_integer(img: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """Float [0, 1] -> uint8/uint16 by clipping and rounding half to even (``np.rint``, as ``img_as_ubyte``)."""
    if bit_depth == 8:
        return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    if bit_depth == 16:
        return np.rint(np.clip(img, 0.0, 1.0) * 65535.0).astype(np.uint16)
    raise ConfigError(f"bit_depth must be 8 or 16, got {bit_depth}")


def write_image(path: str | Path, image: Image | np.ndarray, bit_depth: int | None = None,
                overwrite: bool = False) -> Path:
    """Write float [0, 1] HxWxC pixels (plus alpha) as 8- or 16-bit; refuses to replace a file unless asked."""
    path = Path(path)
    if isinstance(image, np.ndarray):
        image = Image(pixels=image)
    if path.exists() and not overwrite:
        raise ExistingFileError(f"refusing to overwrite existing file {path}")
    depth = bit_depth or (16 if image.bit_depth == 16 else 8)
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg", ".bmp", ".webp") and depth != 8:
        depth = 8
    if suffix not in IMAGE_SUFFIXES:
        raise ConfigError(f"{path}: unsupported output format (use one of {', '.join(IMAGE_SUFFIXES)})")
    px = image.pixels
    if px.ndim == 2:
        px = px[:, :, None]
    if px.shape[2] == 3:
        px = px[:, :, ::-1]
    if image.alpha is not None and suffix not in (".jpg", ".jpeg"):
        px = np.concatenate([px, image.alpha], axis=2)
    out = to_integer(px, depth)
    encoded, data = cv2.imencode(suffix, out if out.shape[2] != 1 else out[:, :, 0])
    if not encoded:
        raise ValueError(f"could not encode image {path} as {suffix}")
    with atomic_writer(path) as file:  # a killed or failed write never leaves a truncated image
        file.write(data.tobytes())
    return path
