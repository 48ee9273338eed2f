"""Degradations: the official Gaussian test noise, and the synthetic stand-ins the demo uses for each task.

Images are float32 HxWxC arrays in [0, 1] (C = 1 or 3), as ``kbnet.imageio.read_image`` returns them.
The Gaussian noise follows the official test protocol bit for bit; the other degradations only need to be
plausible and deterministic, so the demo can train and validate on the same pixels every run.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import kornia
import numpy as np
import torch

from kbnet.data._albumentations import A
from kbnet.errors import ConfigError

TASKS = ("gaussian_denoise", "real_denoise", "derain", "defocus_deblur", "motion_deblur")


def add_gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.RandomState | int) -> np.ndarray:
    """``img + N(0, sigma/255)`` exactly as the official Gaussian test scripts make their noisy inputs.

    The official code runs ``np.random.seed(seed); img += np.random.normal(0, sigma/255, img.shape)`` on a
    float32 image: float64 noise, added and cast back to float32, no clipping, no quantization.
    ``np.random.RandomState(seed)`` draws the same numbers without touching NumPy's global state.
    """
    if isinstance(rng, int):
        rng = np.random.RandomState(rng)
    noisy = img.astype(np.float32, copy=True)
    noisy += rng.normal(0.0, sigma / 255.0, noisy.shape)
    return noisy


def gaussian_noise_like(
    tensor: torch.Tensor, sigma_255: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Noise with the shape, dtype and device of ``tensor`` and std ``sigma_255 / 255`` (add it yourself).

    ``sigma_255`` is a number or a per-sample tensor of shape (B,), for blind training where each patch of a
    B x C x H x W batch gets its own noise level. Like the official training code: not clipped, not quantized.
    """
    noise = torch.randn(tensor.shape, generator=generator, device=tensor.device, dtype=tensor.dtype)
    if isinstance(sigma_255, torch.Tensor) and sigma_255.ndim > 0:
        if sigma_255.shape != tensor.shape[:1]:
            raise ConfigError(
                f"sigma_255 must be a number or have shape ({tensor.shape[0]},) for a batch of "
                f"{tensor.shape[0]}, got shape {tuple(sigma_255.shape)}"
            )
        sigma_255 = sigma_255.to(device=tensor.device, dtype=tensor.dtype)
        sigma_255 = sigma_255.view(-1, *([1] * (tensor.ndim - 1)))
    return noise * (sigma_255 / 255.0)


def validation_sigma(sigma: float | None, sigma_range: list[float] | tuple[float, float] | None) -> float:
    """The σ of the seeded validation noise: the task's σ, or for blind training the centre of its range.

    The official blind recipe trains on σ ∈ [0, 50] and validates at 25, the centre of that range.
    """
    if sigma is not None:
        return float(sigma)
    if sigma_range is not None:
        if len(sigma_range) != 2:
            raise ConfigError(f"sigma_range must be [low, high], got {list(sigma_range)}")
        return (float(sigma_range[0]) + float(sigma_range[1])) / 2.0
    raise ConfigError("Gaussian denoising needs task.sigma or task.sigma_range for its validation noise")


def quantize(img: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and round to 8-bit levels, as a degraded photo saved to PNG would be."""
    return (np.rint(np.clip(img, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def add_poisson_gaussian_noise(
    img: np.ndarray, rng: np.random.Generator, shot: float = 0.008, read: float = 0.0004
) -> np.ndarray:
    """Signal-dependent noise with variance ``shot * x + read``: a stand-in for real camera noise.

    Real sensor noise is heteroscedastic (photon shot noise grows with brightness, read noise does not).
    The defaults give std ≈ 0.02 in the shadows and ≈ 0.09 in the highlights, then 8-bit quantization:
    about 24 dB input PSNR on the demo photos, close to SIDD's noisy inputs.
    """
    std = np.sqrt(shot * np.clip(img, 0.0, 1.0) + read)
    return quantize(img + rng.standard_normal(img.shape) * std)


def add_rain(img: np.ndarray, seed: int) -> np.ndarray:
    """Rain streaks from albumentations ``RandomRain``, seeded so the streaks are the same every run."""
    rgb = img if img.shape[2] == 3 else np.repeat(img, 3, axis=2)
    rain = A.Compose(
        [A.RandomRain(slant_range=(-15, 15), drop_length=12, drop_width=1, blur_value=3,
                      brightness_coefficient=0.85, rain_type="default", p=1.0)],
        seed=seed,
    )
    out = rain(image=np.ascontiguousarray(rgb, dtype=np.float32))["image"]
    if img.shape[2] == 1:
        out = out.mean(axis=2, keepdims=True)
    return quantize(out)


def disk_kernel(radius: float, supersample: int = 8) -> torch.Tensor:
    """A normalized, anti-aliased disk (pillbox) kernel: the point-spread function of an out-of-focus lens."""
    if radius <= 0:
        raise ValueError(f"disk radius must be positive, got {radius}")
    half = max(1, int(np.ceil(radius - 0.5)))  # pixels whose square the disk reaches
    size = 2 * half + 1
    # Sample each pixel on a supersample x supersample grid so the rim is fractional, not a jagged step.
    offsets = (np.arange(size * supersample) + 0.5) / supersample - half - 0.5
    yy, xx = np.meshgrid(offsets, offsets, indexing="ij")
    inside = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    kernel = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    return torch.from_numpy(kernel / kernel.sum()).float()


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].float()


def _to_array(tensor: torch.Tensor) -> np.ndarray:
    return tensor[0].permute(1, 2, 0).numpy()


def defocus_blur(img: np.ndarray, radius: float) -> np.ndarray:
    """Disk-kernel blur (kornia ``filter2d``, reflected borders), then 8-bit quantization."""
    kernel = disk_kernel(radius)[None]
    return quantize(_to_array(kornia.filters.filter2d(_to_tensor(img), kernel, border_type="reflect")))


def motion_blur(img: np.ndarray, kernel_size: int, angle: float, direction: float = 0.0) -> np.ndarray:
    """Linear camera-shake blur (kornia ``motion_blur``: ``angle`` in degrees, ``direction`` in [-1, 1])."""
    out = kornia.filters.motion_blur(_to_tensor(img), kernel_size, angle, direction, border_type="reflect")
    return quantize(_to_array(out))


def photo_seed(name: str, seed: int) -> int:
    """A per-photo seed that depends on the photo's name, not on its position in a list."""
    return (zlib.crc32(name.encode()) + seed) % 2**31


def _demo_gaussian(img: np.ndarray, name: str, seed: int, sigma: float | None) -> np.ndarray:
    if sigma is None:
        raise ConfigError("gaussian_denoise needs a noise level sigma (0-255 units)")
    # The official protocol seeds every image with the same seed, not a per-image one.
    return add_gaussian_noise(img, sigma, seed)


def _demo_real(img: np.ndarray, name: str, seed: int, sigma: float | None) -> np.ndarray:
    return add_poisson_gaussian_noise(img, np.random.default_rng(photo_seed(name, seed)))


def _demo_rain(img: np.ndarray, name: str, seed: int, sigma: float | None) -> np.ndarray:
    return add_rain(img, photo_seed(name, seed))


def _demo_defocus(img: np.ndarray, name: str, seed: int, sigma: float | None) -> np.ndarray:
    radius = np.random.default_rng(photo_seed(name, seed)).uniform(2.0, 3.5)
    return defocus_blur(img, radius)


def _demo_motion(img: np.ndarray, name: str, seed: int, sigma: float | None) -> np.ndarray:
    rng = np.random.default_rng(photo_seed(name, seed))
    return motion_blur(img, kernel_size=9, angle=float(rng.uniform(0.0, 180.0)),
                       direction=float(rng.uniform(-0.5, 0.5)))


_DEMO_DEGRADATIONS: dict[str, Callable[[np.ndarray, str, int, float | None], np.ndarray]] = {
    "gaussian_denoise": _demo_gaussian,
    "real_denoise": _demo_real,
    "derain": _demo_rain,
    "defocus_deblur": _demo_defocus,
    "motion_deblur": _demo_motion,
}


def degrade(task: str, img: np.ndarray, name: str, seed: int = 0, sigma: float | None = None) -> np.ndarray:
    """The demo's degraded version of a clean photo for ``task``; the same name and seed give the same pixels.

    ``sigma`` (0-255 units) is the Gaussian noise level and is required for ``gaussian_denoise`` only.
    """
    if task not in _DEMO_DEGRADATIONS:
        raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return _DEMO_DEGRADATIONS[task](img, name, seed, sigma)
