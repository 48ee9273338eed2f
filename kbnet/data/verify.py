"""Check every training and validation file before step 0 (``data.verify``), so a bad file stops the run at
launch with the full list of bad files, instead of crashing it at the step that first draws the file.

Modes:

* ``header`` (default): PNG files are walked chunk by chunk with every chunk's CRC checked (a truncated or
  corrupted file fails) and their size, channels and bit depth read from ``IHDR``; JPEG files have their frame
  header read and must end with the end-of-image marker; other formats (TIFF, BMP, WebP) are decoded, since their
  headers say too little. Reading is I/O-bound and runs on a few threads.
* ``full``: every file is decoded as training will decode it (``kbnet.imageio.read_image``).
* ``off``: nothing is read before training.

Every file must be readable with 1-4 channels at 8 or 16 bits (float TIFF too), and the input and target of a
pair must have the same width and height.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import Dataset

from kbnet.data.datasets import CleanImageDataset, GaussianNoiseDataset, PairedImageDataset
from kbnet.errors import ConfigError, DataError

log = logging.getLogger(__name__)

VERIFY_MODES = ("header", "full", "off")
LIST_LIMIT = 20
"""Bad files listed by name; the rest are counted."""
PROGRESS_MIN_FILES = 500
"""Smaller sets are checked in well under a second: no progress bar."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageCheckError(ValueError):
    """Why one file cannot be used (collected, then reported together)."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    channels: int
    bit_depth: int


def png_info(data: bytes) -> ImageInfo:
    """Size, channels and bit depth from ``IHDR``, after checking that every chunk up to ``IEND`` is intact."""
    pos, info = len(PNG_SIGNATURE), None
    while True:
        if pos + 8 > len(data):
            raise ImageCheckError("truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise ImageCheckError(f"truncated PNG (chunk {kind.decode('latin-1')!r} is cut off)")
        body = data[pos + 4:pos + 8 + length]
        if zlib.crc32(body) != struct.unpack(">I", data[end - 4:end])[0]:
            raise ImageCheckError(f"corrupt PNG (bad CRC in chunk {kind.decode('latin-1')!r})")
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[4:14])
            if colour not in PNG_CHANNELS:
                raise ImageCheckError(f"PNG colour type {colour} is not valid")
            info = ImageInfo(width, height, PNG_CHANNELS[colour], 16 if depth == 16 else 8)
        elif kind == b"IEND":
            if info is None:
                raise ImageCheckError("PNG without an IHDR chunk")
            return info
        pos = end


def jpeg_info(data: bytes) -> ImageInfo:
    """Size and channels from the frame header; the file must end with the end-of-image marker."""
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ImageCheckError("truncated JPEG (no end-of-image marker)")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ImageCheckError("corrupt JPEG (bad segment marker)")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker in JPEG_FRAME_MARKERS:
            precision, height, width, components = struct.unpack(">BHHB", data[pos + 4:pos + 10])
            return ImageInfo(width, height, components, precision)
        if marker == 0xDA:
            break
        pos += 2 + length
    raise ImageCheckError("corrupt JPEG (no frame header)")


def decoded_info(path: Path) -> ImageInfo:
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ImageCheckError("cannot decode (corrupt or unsupported format)")
    depth = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16, np.dtype(np.float32): 32}.get(raw.dtype)
    if depth is None:
        raise ImageCheckError(f"unsupported pixel type {raw.dtype} (expected 8- or 16-bit integers or float)")
    return ImageInfo(raw.shape[1], raw.shape[0], 1 if raw.ndim == 2 else raw.shape[2], depth)


def image_info(path: Path, mode: str) -> ImageInfo:
    """What ``mode`` learns about one file; raises ``ImageCheckError`` with the reason it cannot be used."""
    try:
        if mode == "full":
            info = decoded_info(path)
        else:
            data = path.read_bytes()
            if data.startswith(PNG_SIGNATURE):
                info = png_info(data)
            elif data.startswith(b"\xff\xd8"):
                info = jpeg_info(data)
            else:
                info = decoded_info(path)
    except OSError as err:
        raise ImageCheckError(f"cannot read ({err.strerror or err})") from err
    except struct.error as err:
        raise ImageCheckError("truncated or corrupt header") from err
    if info.width < 1 or info.height < 1:
        raise ImageCheckError(f"empty image ({info.width}x{info.height})")
    if not 1 <= info.channels <= 4:
        raise ImageCheckError(f"{info.channels} channels (expected gray, RGB, with or without alpha)")
    if info.bit_depth not in (8, 16, 32):
        raise ImageCheckError(f"{info.bit_depth}-bit samples (expected 8 or 16)")
    return info


def dataset_files(dataset: Dataset) -> list[tuple[Path, Path | None]]:
    """(input, target) files of a dataset; target None where the input is its own target. Datasets held in
    memory (the demo photos, SIDD's .mat blocks, checked when loaded) have no files to check."""
    if isinstance(dataset, PairedImageDataset):
        return [(Path(a), Path(b)) for a, b in dataset.pairs]
    if isinstance(dataset, CleanImageDataset | GaussianNoiseDataset):
        return [(Path(f), None) for f in dataset.files]
    return []


def _check_pair(pair: tuple[Path, Path | None], mode: str) -> list[str]:
    problems, infos = [], []
    for path in (p for p in pair if p is not None):
        try:
            infos.append(image_info(path, mode))
        except ImageCheckError as err:
            problems.append(f"{path}: {err}")
    if len(infos) == 2 and (infos[0].width, infos[0].height) != (infos[1].width, infos[1].height):
        problems.append(f"{pair[0]} is {infos[0].width}x{infos[0].height} but its target {pair[1]} is "
                        f"{infos[1].width}x{infos[1].height} (width x height)")
    return problems


def verify_datasets(datasets: Mapping[str, Dataset], mode: str) -> int:
    """Check every file of ``datasets`` (name -> dataset); returns the number of files checked, or raises a
    ``DataError`` that lists the first bad files and counts all of them."""
    if mode not in VERIFY_MODES:
        raise ConfigError(f"data.verify={mode!r}: expected one of {', '.join(VERIFY_MODES)}")
    if mode == "off":
        log.info("data.verify=off: the data files are not checked before training")
        return 0
    pairs = [pair for dataset in datasets.values() for pair in dataset_files(dataset)]
    if not pairs:
        return 0
    problems: list[str] = []
    columns = (TextColumn("checking data files"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar = Progress(*columns, console=Console(stderr=True), transient=True, disable=len(pairs) < PROGRESS_MIN_FILES)
    with bar, ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        task = bar.add_task("check", total=len(pairs))
        for found in pool.map(lambda pair: _check_pair(pair, mode), pairs):
            problems.extend(found)
            bar.advance(task)
    files = sum(1 + (target is not None) for _, target in pairs)
    if problems:
        shown = "\n".join(f"  {line}" for line in problems[:LIST_LIMIT])
        more = f"\n  ... and {len(problems) - LIST_LIMIT} more" if len(problems) > LIST_LIMIT else ""
        raise DataError(f"{len(problems)} problem(s) in the {files} data files of {', '.join(datasets)} "
                        f"(data.verify={mode}); nothing was trained:\n{shown}{more}\n"
                        "Fix or remove these files (data.verify=off skips this check).")
    log.info("data.verify=%s: %d files of %s are readable and paired", mode, files, ", ".join(datasets))
    return files
