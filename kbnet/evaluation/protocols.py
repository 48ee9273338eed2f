"""The per-task test protocols of the paper and its official test scripts, each one object: how the input reaches
the network, how the output is rounded, and which metrics are computed on what.

| task | forward | output scored as | metrics |
|---|---|---|---|
| gaussian_denoise | reflect-pad to 8, whole image | uint8 (``rint``) | PSNR (+ MATLAB-style SSIM) |
| real_denoise (SIDD) | whole 256x256 block | float in [0, 1] | PSNR, SSIM MATLAB-style and legacy-skimage |
| derain | reflect-pad to 8, whole image | uint8 | PSNR/SSIM on MATLAB ``rgb2ycbcr`` Y |
| defocus_deblur (DPDD) | official 1024/64 centre-crop tiles | float in [0, 1] | PSNR, SSIM (skimage), MAE |
| motion_deblur | reflect-pad to 8, whole image | uint8 | PSNR, SSIM on RGB (Restormer's GoPro/HIDE) |

The Gaussian noise itself (seed 0 per image, float64 noise, no clip) is added by the data sets
(``kbnet.data.GaussianNoiseDataset``), so a protocol only sees the noisy float input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from kbnet.errors import ConfigError
from kbnet.imageio import to_integer
from kbnet.metrics import mae, psnr, ssim, ssim_dpdd, ssim_skimage_legacy

Metric = Callable[[np.ndarray, np.ndarray], float]


def psnr_y(pred: np.ndarray, target: np.ndarray) -> float:
    return psnr(pred, target, y_channel=True)


def ssim_y(pred: np.ndarray, target: np.ndarray) -> float:
    return ssim(pred, target, y_channel=True)


def indoor_outdoor_pairs(set_names: Sequence[str]) -> dict[str, list[str]]:
    """``X_combined`` for every ``X_indoor``/``X_outdoor`` pair of test sets (DPDD's combined scores)."""
    names = set(set_names)
    return {f"{name[:-len('_indoor')]}_combined": [name, name[:-len('_indoor')] + "_outdoor"]
            for name in set_names if name.endswith("_indoor") and name[:-len("_indoor")] + "_outdoor" in names}


def no_combinations(set_names: Sequence[str]) -> dict[str, list[str]]:
    return {}


@dataclass(frozen=True)
class Protocol:
    """How one task is tested.

    Attributes:
        pad_multiple: reflect-pad right/bottom to this multiple before the network (``None``: no pad).
        tile / tile_overlap: the official centre-crop tiling (``patch_forward``), ``None`` for whole images.
        quantize: score (and save) the output rounded to uint8, as the scripts that save PNGs before scoring.
        metrics: name -> function of (restored, target), both uint8 when ``quantize``, else float32 in [0, 1].
        combine: which test sets are also scored together (name -> member sets), pooling per-image values.
    """

    name: str
    description: str
    metrics: Mapping[str, Metric]
    pad_multiple: int | None = None
    tile: int | None = None
    tile_overlap: int = 64
    quantize: bool = False
    combine: Callable[[Sequence[str]], dict[str, list[str]]] = field(default=no_combinations)

    def score(self, restored: np.ndarray, target: np.ndarray) -> dict[str, float]:
        """Metrics of one image: ``restored`` is the clamped float output, ``target`` the float ground truth."""
        pred, gt = self.scored_pixels(restored), self.scored_pixels(target)
        return {name: float(metric(pred, gt)) for name, metric in self.metrics.items()}

    def scored_pixels(self, img: np.ndarray) -> np.ndarray:
        """The pixels the metrics see: uint8 (``rint``, as ``img_as_ubyte``) or float32."""
        return to_integer(img, 8) if self.quantize else img.astype(np.float32, copy=False)


PROTOCOLS: dict[str, Protocol] = {
    "gaussian_denoise": Protocol(
        "gaussian_denoise",
        "official Gaussian test: seeded noise (seed 0 per image), reflect-pad to 8, whole image, output rounded to "
        "uint8; PSNR on uint8 (RGB or gray); SSIM (MATLAB-style, not in the paper) for reference",
        {"psnr": psnr, "ssim": ssim}, pad_multiple=8, quantize=True),
    "real_denoise": Protocol(
        "real_denoise",
        "official SIDD test: 256x256 blocks, no padding, float output clamped to [0, 1]; PSNR on float; SSIM "
        "MATLAB-style (Gaussian 11x11, L = 1) and as the official script computed it (old scikit-image defaults: "
        "7x7 box window, L = 2)",
        {"psnr": psnr, "ssim": ssim, "ssim_legacy": ssim_skimage_legacy}),
    "derain": Protocol(
        "derain",
        "official deraining test: reflect-pad to 8, whole image, output rounded to uint8; PSNR and SSIM on the "
        "MATLAB rgb2ycbcr Y channel (uint8), as evaluate_PSNR_SSIM.m",
        {"psnr_y": psnr_y, "ssim_y": ssim_y}, pad_multiple=8, quantize=True),
    "defocus_deblur": Protocol(
        "defocus_deblur",
        "official DPDD test: patch_forward tiles of 1024 with a 64-pixel margin, float output clamped to [0, 1]; "
        "PSNR on float, SSIM as skimage structural_similarity(data_range=1), MAE; indoor, outdoor and combined "
        "(per-image mean over both); LPIPS is not computed (it needs downloaded AlexNet weights)",
        {"psnr": psnr, "ssim": ssim_dpdd, "mae": mae}, tile=1024, tile_overlap=64, combine=indoor_outdoor_pairs),
    "motion_deblur": Protocol(
        "motion_deblur",
        "not in the paper; Restormer's GoPro/HIDE test: reflect-pad to 8, whole image, output rounded to uint8; "
        "PSNR and SSIM (MATLAB-style) on RGB",
        {"psnr": psnr, "ssim": ssim}, pad_multiple=8, quantize=True),
}


def get_protocol(task: str) -> Protocol:
    if task not in PROTOCOLS:
        raise ConfigError(f"no evaluation protocol for task {task!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[task]
