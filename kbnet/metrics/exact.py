"""Paper-exact PSNR and SSIM, as the official evaluation scripts compute them.

PSNR is ``10*log10(peak^2/MSE)`` in float64 (MATLAB's ``20*log10(255/RMSE)`` is the same number). SSIM is
Wang et al.'s ``SSIM_index`` / BasicSR ``calculate_ssim``: 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
K2 = 0.03, filtering restricted to the valid region (MATLAB ``filter2(..., 'valid')``: no padding, the map is
10 px smaller than the image in each dimension), computed per channel and averaged over channels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.ndimage import correlate1d

from kbnet.metrics.convert import prepare_pair

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def psnr(pred: Any, target: Any, *, crop_border: int = 0, y_channel: bool = False) -> float:
    """PSNR in dB; peak 255 for uint8 input, 1 for float input. Identical images give ``math.inf``.

    ``crop_border`` removes that many pixels from every side first; ``y_channel`` compares MATLAB
    ``rgb2ycbcr`` luma (rounded to uint8 for uint8 input, as the deraining protocol does).
    """
    a, b, peak = prepare_pair(pred, target, crop_border=crop_border, y_channel=y_channel)
    return psnr_from_mse(float(np.mean((a - b) ** 2)), peak)


def psnr_from_mse(mse: float, peak: float) -> float:
    """PSNR for a known MSE; ``inf`` when the MSE is zero instead of a division-by-zero warning."""
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def ssim(pred: Any, target: Any, *, crop_border: int = 0, y_channel: bool = False) -> float:
    """MATLAB/BasicSR SSIM: Gaussian 11x11 window, valid region, channel mean; L = 255 (uint8) or 1 (float).

    Identical images give exactly 1. Images smaller than 11x11 (after ``crop_border``) have no valid region
    and raise ValueError (MATLAB's ``SSIM_index`` returns -Inf there).
    """
    a, b, peak = prepare_pair(pred, target, crop_border=crop_border, y_channel=y_channel)
    return float(np.mean([ssim_map(a[..., c], b[..., c], peak).mean() for c in range(a.shape[2])]))


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian; its outer product is MATLAB's ``fspecial('gaussian', size, sigma)``."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable correlation keeping only outputs whose window lies inside the image (``filter2 'valid'``)."""
    r = len(kernel) // 2
    out = correlate1d(img, kernel, axis=0, mode="constant")[r:-r]
    return correlate1d(out, kernel, axis=1, mode="constant")[:, r:-r]


def ssim_map(a: np.ndarray, b: np.ndarray, peak: float) -> np.ndarray:
    """SSIM map of two 2-D float64 images over the valid region; C1 and C2 follow from ``peak``."""
    if min(a.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (after "
                         f"crop_border), got {a.shape[0]}x{a.shape[1]}")
    c1 = (SSIM_K1 * peak) ** 2
    c2 = (SSIM_K2 * peak) ** 2
    g = gaussian_window_1d()
    mu_a = _filter_valid(a, g)
    mu_b = _filter_valid(b, g)
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a = _filter_valid(a * a, g) - mu_aa
    var_b = _filter_valid(b * b, g) - mu_bb
    cov = _filter_valid(a * b, g) - mu_ab
    return ((2 * mu_ab + c1) * (2 * cov + c2)) / ((mu_aa + mu_bb + c1) * (var_a + var_b + c2))
