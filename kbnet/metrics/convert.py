"""Turn metric inputs into one array layout and compute MATLAB's ``rgb2ycbcr`` luma.

Every exact metric works on float64 HxWxC numpy arrays whose values keep the input's scale: 0..255 for uint8
input, 0..1 for float input. Keeping the scale (instead of normalising everything to [0, 1]) is what makes the
uint8 protocols bit-exact: MATLAB computes PSNR/SSIM on ``double(uint8)`` values with L = 255.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# MATLAB rgb2ycbcr, first row of origT: Y = 16 + 65.481 R + 128.553 G + 24.966 B with R, G, B in [0, 1].
Y_COEFFS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0


def as_hwc(img: Any, what: str = "image") -> np.ndarray:
    """Return ``img`` as an HxWxC numpy array, uint8 kept as uint8 and any float as float64.

    Accepts numpy HxW / HxWxC arrays and torch HxW / CxHxW / 1xCxHxW tensors (torch is channel-first, numpy is
    channel-last: the layouts the rest of the project produces).
    """
    if _is_torch_tensor(img):
        arr = img.detach().cpu()
        if arr.ndim == 4:
            if arr.shape[0] != 1:
                raise ValueError(f"{what}: a 4-D tensor must hold one image (1xCxHxW), got shape "
                                 f"{tuple(arr.shape)}; use psnr_torch/ssim_torch for batches")
            arr = arr[0]
        if arr.ndim == 3:
            arr = arr.permute(1, 2, 0)
        elif arr.ndim != 2:
            raise ValueError(f"{what}: expected a HxW, CxHxW or 1xCxHxW tensor, got shape {tuple(arr.shape)}")
        if arr.dtype.is_floating_point:
            arr = arr.double()
        arr = arr.numpy()
    elif isinstance(img, np.ndarray):
        arr = img
        if arr.ndim not in (2, 3):
            raise ValueError(f"{what}: expected a HxW or HxWxC array, got shape {arr.shape}")
    else:
        raise TypeError(f"{what}: expected a numpy array or a torch tensor, got {type(img).__name__}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float64, copy=False)
    raise ValueError(f"{what}: expected uint8 (0..255) or float (0..1) pixels, got dtype {arr.dtype}")


def _is_torch_tensor(obj: Any) -> bool:
    """True for torch tensors, without importing torch for numpy-only callers."""
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach")


def prepare_pair(pred: Any, target: Any, *, crop_border: int = 0,
                 y_channel: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Validate a pair, crop its border, optionally take MATLAB Y, and return float64 arrays plus their peak.

    The peak is 255 for uint8 input and 1 for float input (the data range of the protocol).
    """
    a = as_hwc(pred, "pred")
    b = as_hwc(target, "target")
    if a.shape != b.shape:
        raise ValueError(f"pred and target differ in shape: pred {_shape_of(pred)} vs target "
                         f"{_shape_of(target)}")
    if (a.dtype == np.uint8) != (b.dtype == np.uint8):
        raise ValueError(f"pred is {a.dtype} but target is {b.dtype}: pass both as uint8 (0..255) or both as "
                         "float (0..1)")
    if not isinstance(crop_border, int | np.integer) or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative integer, got {crop_border!r}")
    h, w = a.shape[:2]
    if 2 * crop_border >= min(h, w):
        raise ValueError(f"crop_border={crop_border} leaves nothing of a {h}x{w} image")
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    peak = 255.0 if a.dtype == np.uint8 else 1.0
    if y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    return a.astype(np.float64), b.astype(np.float64), peak


def _shape_of(img: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in img.shape)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Y of MATLAB ``rgb2ycbcr`` (BT.601 studio swing) as HxWx1, in the input's dtype and scale.

    uint8: Y in 16..235, computed as MATLAB does (coefficients ``(1/255)*origT`` in double, summed R, G, B,
    then the offset, rounded half away from zero), so the 194 RGB triples whose exact Y is a half-integer
    round as MATLAB's double arithmetic makes them. Float in [0, 1]: Y in [16/255, 235/255], not rounded.
    A 1-channel image is returned unchanged, as the MATLAB evaluation script converts only 3-channel images.
    """
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise ValueError(f"Y channel needs an RGB (HxWx3) or gray (HxWx1) image, got shape {img.shape}")
    if img.shape[2] == 1:
        return img
    if img.dtype == np.uint8:
        rgb = img.astype(np.float64)
        t_r, t_g, t_b = ((1.0 / 255.0) * c for c in Y_COEFFS)
        y = t_r * rgb[..., 0] + t_g * rgb[..., 1] + t_b * rgb[..., 2] + Y_OFFSET
        return round_half_away(y).clip(0, 255).astype(np.uint8)[:, :, None]
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"Y channel needs uint8 or float pixels, got dtype {img.dtype}")
    t_r, t_g, t_b = ((1.0 / 255.0) * c for c in Y_COEFFS)
    y = t_r * img[..., 0] + t_g * img[..., 1] + t_b * img[..., 2] + (1.0 / 255.0) * Y_OFFSET
    return y[:, :, None].astype(img.dtype, copy=False)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """MATLAB ``round``: halves go away from zero (numpy's ``rint`` sends them to the even neighbour)."""
    mag = np.abs(x)
    whole = np.floor(mag)
    return np.sign(x) * (whole + (mag - whole >= 0.5))
