"""The scikit-image SSIM conventions of the official SIDD and DPDD test scripts, and DPDD's MAE.

Both scripts call ``skimage.metrics.structural_similarity`` with its defaults: a 7x7 uniform window, sample
covariance (N/(N-1) normalisation), K1 = 0.01, K2 = 0.03, the map averaged after dropping 3 px on each side,
per channel then averaged over channels. They differ in the data range:

* SIDD (``structural_similarity(gt, out, multichannel=True)`` on float32): scikit-image of that era inferred
  the range from the dtype, -1..1 for floats, so L = 2. This inflates SSIM against MATLAB's ``ssim``;
  we report it next to the MATLAB-style value, so numbers compare with the paper's table and with MATLAB.
* DPDD (``structural_similarity(gt, out, data_range=1, multichannel=True)``): L = 1.

Implemented here with scipy so the numbers do not move with scikit-image releases.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import uniform_filter

from kbnet.metrics.convert import prepare_pair

LEGACY_WINDOW = 7


def ssim_uniform(pred: Any, target: Any, *, data_range: float, win_size: int = LEGACY_WINDOW) -> float:
    """scikit-image's default SSIM (uniform window, sample covariance), channel mean, explicit range."""
    a, b, _ = prepare_pair(pred, target)
    return _mean_ssim(a, b, data_range, win_size)


def ssim_skimage_legacy(pred: Any, target: Any) -> float:
    """SIDD "official script" SSIM: old scikit-image defaults, i.e. L = 2 on float input (255 on uint8)."""
    a, b, peak = prepare_pair(pred, target)
    return _mean_ssim(a, b, 2.0 if peak == 1.0 else peak, LEGACY_WINDOW)


def ssim_dpdd(pred: Any, target: Any) -> float:
    """DPDD SSIM: ``structural_similarity(data_range=1, channel_axis=2)`` on float (L = 255 on uint8)."""
    a, b, peak = prepare_pair(pred, target)
    return _mean_ssim(a, b, peak, LEGACY_WINDOW)


def mae(pred: Any, target: Any) -> float:
    """Mean absolute error on the [0, 1] scale (uint8 input is divided by 255), as DPDD's MAE."""
    a, b, peak = prepare_pair(pred, target)
    return float(np.mean(np.abs(a - b)) / peak)


def _mean_ssim(a: np.ndarray, b: np.ndarray, data_range: float, win_size: int) -> float:
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd integer >= 3, got {win_size}")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    if min(a.shape[:2]) < win_size:
        raise ValueError(f"SSIM with a {win_size}x{win_size} window needs images at least that large, got "
                         f"{a.shape[0]}x{a.shape[1]}")
    return float(np.mean([_uniform_ssim_map(a[..., c], b[..., c], data_range, win_size).mean()
                          for c in range(a.shape[2])]))


def _uniform_ssim_map(a: np.ndarray, b: np.ndarray, data_range: float, win_size: int) -> np.ndarray:
    """Valid-region SSIM map with a box window; variances use N-1 as scikit-image's default does."""
    n = win_size * win_size
    cov_norm = n / (n - 1)
    r = win_size // 2
    crop = (slice(r, -r), slice(r, -r))
    mu_a = uniform_filter(a, win_size)[crop]
    mu_b = uniform_filter(b, win_size)[crop]
    var_a = cov_norm * (uniform_filter(a * a, win_size)[crop] - mu_a * mu_a)
    var_b = cov_norm * (uniform_filter(b * b, win_size)[crop] - mu_b * mu_b)
    cov = cov_norm * (uniform_filter(a * b, win_size)[crop] - mu_a * mu_b)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    return num / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
