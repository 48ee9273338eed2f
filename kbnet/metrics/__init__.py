"""Image-quality metrics exactly as the KBNet / Restormer evaluation protocols compute them.

* ``psnr``, ``ssim``: paper-exact (MATLAB / BasicSR), on uint8 or float images, optional MATLAB Y channel.
* ``ssim_skimage_legacy`` (SIDD script), ``ssim_dpdd`` and ``mae`` (DPDD script): scikit-image conventions.
* ``psnr_torch``, ``ssim_torch``: batched per-image values on tensors, for validation during training;
  ``ImageMean``: their mean over a set and over all ranks (a torchmetrics ``Metric``).
* ``mean_metric``, ``MetricTable``: per-image values averaged over a set, with CSV/JSON/Markdown reports.

Scoring folders of result files lives in ``kbnet.metrics.score`` (also ``python -m kbnet.metrics.score``).
"""

from kbnet.metrics.aggregate import MetricTable, mean_metric
from kbnet.metrics.convert import rgb_to_y
from kbnet.metrics.exact import psnr, ssim
from kbnet.metrics.legacy import mae, ssim_dpdd, ssim_skimage_legacy, ssim_uniform
from kbnet.metrics.torch_metrics import ImageMean, psnr_torch, rgb_to_y_torch, ssim_torch, to_y_uint8_levels

__all__ = [
    "ImageMean",
    "MetricTable",
    "mae",
    "mean_metric",
    "psnr",
    "psnr_torch",
    "rgb_to_y",
    "rgb_to_y_torch",
    "ssim",
    "ssim_dpdd",
    "ssim_skimage_legacy",
    "ssim_torch",
    "ssim_uniform",
    "to_y_uint8_levels",
]
