"""Batched PSNR / SSIM on float tensors for validation during training, one value per image, and the running
mean of such values over a validation set on every rank.

PSNR is torchmetrics' own (``peak_signal_noise_ratio`` with ``dim=(1, 2, 3)``, ``reduction="none"``,
``data_range``), which is the paper's per-image PSNR. SSIM is not torchmetrics': its
``structural_similarity_index_measure`` pads each image and averages the whole SSIM map, while the paper's
MATLAB/BasicSR SSIM averages only the valid region (the map shrinks by 5 px per side for the 11x11 window), so
``ssim_torch`` computes that valid-region Gaussian SSIM itself. Both follow the exact metrics' definitions
(MATLAB studio-swing Y with ``y_channel``) on any device. Differences from the exact numpy metrics: float32
arithmetic (inputs are upcast to at least float32) and, with ``y_channel``, Y is left unrounded: the deraining
protocol rounds Y to uint8 after rounding the output to uint8, which only the exact metrics on uint8 input
reproduce (measured gap on noisy real images: 0.006 to 0.11 dB PSNR, 2e-4 to 1.5e-3 SSIM). Against the exact
metrics on the same float input: PSNR within 4e-6 dB, SSIM within 3e-7 (tests assert 1e-4 dB and 1e-5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.functional.image import peak_signal_noise_ratio

from kbnet.metrics.convert import Y_COEFFS, Y_OFFSET
from kbnet.metrics.exact import SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_WINDOW, gaussian_window_1d


def _check_pair(pred: torch.Tensor, target: torch.Tensor,
                crop_border: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate BxCxHxW float tensors, crop, and upcast half precision to float32 for the sums."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in shape: pred {tuple(pred.shape)} vs target "
                         f"{tuple(target.shape)}")
    if pred.ndim != 4:
        raise ValueError(f"expected BxCxHxW tensors, got shape {tuple(pred.shape)}")
    if not (pred.dtype.is_floating_point and target.dtype.is_floating_point):
        raise ValueError(f"expected float tensors in [0, data_range], got {pred.dtype} and {target.dtype}")
    if crop_border < 0 or 2 * crop_border >= min(pred.shape[-2:]):
        raise ValueError(f"crop_border={crop_border} is invalid for {pred.shape[-2]}x{pred.shape[-1]} images")
    if crop_border:
        pred = pred[..., crop_border:-crop_border, crop_border:-crop_border]
        target = target[..., crop_border:-crop_border, crop_border:-crop_border]
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return pred.to(dtype), target.to(dtype)


def rgb_to_y_torch(img: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """MATLAB ``rgb2ycbcr`` Y of Bx3xHxW RGB in [0, data_range] as Bx1xHxW, unrounded; gray passes through."""
    if img.shape[1] == 1:
        return img
    if img.shape[1] != 3:
        raise ValueError(f"Y channel needs 1 or 3 channels, got shape {tuple(img.shape)}")
    r, g, b = img[:, 0:1], img[:, 1:2], img[:, 2:3]
    return (Y_COEFFS[0] * r + Y_COEFFS[1] * g + Y_COEFFS[2] * b) / 255.0 + Y_OFFSET / 255.0 * data_range


def to_y_uint8_levels(rgb: torch.Tensor) -> torch.Tensor:
    """MATLAB ``rgb2ycbcr`` Y of the 8-bit-rounded image, itself rounded to 8 bits, scaled to [0, 1].

    The deraining protocol saves outputs as 8-bit PNGs and scores MATLAB's uint8 Y; rounding half away from
    zero (``floor(x + 0.5)`` for these non-negative values) matches MATLAB.
    """
    rgb8 = torch.floor(rgb.clamp(0, 1) * 255 + 0.5) / 255
    return torch.floor(rgb_to_y_torch(rgb8) * 255 + 0.5) / 255


def psnr_torch(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, y_channel: bool = False,
               crop_border: int = 0) -> torch.Tensor:
    """PSNR in dB of each image of a BxCxHxW batch, shape (B,); ``inf`` for an identical pair."""
    pred, target = _check_pair(pred, target, crop_border)
    if y_channel:
        pred, target = rgb_to_y_torch(pred, data_range), rgb_to_y_torch(target, data_range)
    return peak_signal_noise_ratio(pred, target, data_range=data_range, reduction="none", dim=(1, 2, 3))


def ssim_torch(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, y_channel: bool = False,
               crop_border: int = 0) -> torch.Tensor:
    """MATLAB-style SSIM (Gaussian 11x11, sigma 1.5, valid region, channel mean) per image, shape (B,)."""
    pred, target = _check_pair(pred, target, crop_border)
    if y_channel:
        pred, target = rgb_to_y_torch(pred, data_range), rgb_to_y_torch(target, data_range)
    b, c, h, w = pred.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (after "
                         f"crop_border), got {h}x{w}")
    # Variances and covariance do not change when both images are shifted by the same constant; removing the
    # target's per-channel mean keeps E[x^2] - mu^2 from cancelling badly in float32. The luminance term needs
    # the true means, so the shift is added back to them.
    shift = target.mean(dim=(2, 3), keepdim=True)
    x, y = pred - shift, target - shift
    g = torch.from_numpy(gaussian_window_1d(SSIM_WINDOW, SSIM_SIGMA)).to(pred)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1).reshape(b * 5 * c, 1, h, w)
    stack = F.conv2d(stack, g.view(1, 1, SSIM_WINDOW, 1))
    stack = F.conv2d(stack, g.view(1, 1, 1, SSIM_WINDOW))
    mu_x, mu_y, e_xx, e_yy, e_xy = stack.reshape(b, 5, c, h - SSIM_WINDOW + 1, w - SSIM_WINDOW + 1).unbind(1)
    var_x, var_y, cov = e_xx - mu_x * mu_x, e_yy - mu_y * mu_y, e_xy - mu_x * mu_y
    mu_x, mu_y = mu_x + shift, mu_y + shift
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    ssim_map = num / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


class ImageMean(Metric):
    """The mean of per-image values (PSNR, SSIM, ...) over a whole set, each image counted once on every rank.

    The states are a float64 sum and an image count, both summed over the processes (``dist_reduce_fx="sum"``)
    and divided once, so ranks holding different numbers of images still give the mean over all images (a mean of
    per-rank means would not), and ``keep`` leaves out the copies a ``DistributedSampler`` pads a set with.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add the images of a batch (``values``: one per image); ``keep`` marks the real (unpadded) ones."""
        if keep is None:
            keep = torch.ones_like(values, dtype=torch.bool)
        self.total += values[keep].double().sum()
        self.count += keep.sum().double()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()
