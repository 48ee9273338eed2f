"""Image files written the way users' images are: OpenCV's channel order, 8 or 16 bits."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def write_rgb(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB (or RGBA, or 2-D gray) array with OpenCV's BGR(A) order, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rgb if rgb.ndim == 2 else rgb[:, :, [2, 1, 0, 3][: rgb.shape[2]]]
    assert cv2.imwrite(str(path), np.ascontiguousarray(pixels))
    return path
