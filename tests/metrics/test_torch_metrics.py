"""Batched torch metrics agree with the exact numpy ones, image by image.

Measured on these images (float32 tensors): PSNR within 4e-6 dB, SSIM within 3e-7; asserted with margin.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data

from kbnet.imageio import to_integer
from kbnet.metrics import ImageMean, psnr, psnr_torch, ssim, ssim_torch

PSNR_TOL_DB = 1e-4
SSIM_TOL = 1e-5


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three real 96x112 images with three noise levels (clamped to [0, 1] as validation outputs are)."""
    crops = [data.astronaut()[100:196, 150:262], data.chelsea()[60:156, 120:232],
             np.repeat(data.camera()[200:296, 200:312, None], 3, axis=2)]
    target = torch.stack([torch.from_numpy(c).permute(2, 0, 1).float() / 255.0 for c in crops])
    sigma = torch.tensor([0.02, 0.06, 0.15]).view(3, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    pred = (target + sigma * torch.randn(target.shape, generator=gen)).clamp(0, 1)
    return pred, target


def _exact(metric, pred: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    return torch.tensor([metric(p, t, **kwargs) for p, t in zip(pred, target, strict=True)], dtype=torch.float64)


@pytest.mark.parametrize("crop_border", [0, 4])
def test_psnr_torch_per_image_matches_exact(batch, crop_border):
    pred, target = batch
    got = psnr_torch(pred, target, crop_border=crop_border)
    assert got.shape == (3,)
    expected = _exact(psnr, pred, target, crop_border=crop_border)
    assert torch.allclose(got.double(), expected, atol=PSNR_TOL_DB, rtol=0)
    pooled = 10 * math.log10(1 / float((pred - target).pow(2).mean()))
    assert abs(got.double().mean().item() - pooled) > 0.5


@pytest.mark.parametrize("crop_border", [0, 3])
def test_ssim_torch_per_image_matches_exact(batch, crop_border):
    pred, target = batch
    got = ssim_torch(pred, target, crop_border=crop_border)
    assert got.shape == (3,)
    assert torch.allclose(got.double(), _exact(ssim, pred, target, crop_border=crop_border), atol=SSIM_TOL, rtol=0)


def test_y_channel_float_matches_exact_float(batch):
    pred, target = batch
    assert torch.allclose(psnr_torch(pred, target, y_channel=True).double(),
                          _exact(psnr, pred, target, y_channel=True), atol=PSNR_TOL_DB, rtol=0)
    assert torch.allclose(ssim_torch(pred, target, y_channel=True).double(),
                          _exact(ssim, pred, target, y_channel=True), atol=SSIM_TOL, rtol=0)


def test_y_channel_float_differs_from_uint8_rounded_protocol(batch):
    """The deraining protocol rounds output and Y to uint8; unrounded float Y is close but not equal."""
    pred, target = batch
    as_u8 = [(to_integer(p.permute(1, 2, 0).numpy()), to_integer(t.permute(1, 2, 0).numpy()))
             for p, t in zip(pred, target, strict=True)]
    rounded = torch.tensor([psnr(p, t, y_channel=True) for p, t in as_u8], dtype=torch.float64)
    diff = (psnr_torch(pred, target, y_channel=True).double() - rounded).abs()
    assert diff.max() > PSNR_TOL_DB
    assert diff.max() < 0.5


def test_data_range_255(batch):
    pred, target = batch
    assert torch.allclose(psnr_torch(pred * 255, target * 255, data_range=255.0), psnr_torch(pred, target),
                          atol=1e-4)
    assert torch.allclose(ssim_torch(pred * 255, target * 255, data_range=255.0, y_channel=True),
                          ssim_torch(pred, target, y_channel=True), atol=1e-5)


def test_identical_and_symmetric(batch):
    pred, target = batch
    assert torch.isinf(psnr_torch(target, target.clone())).all()
    assert torch.equal(ssim_torch(target, target.clone()), torch.ones(3))
    assert torch.allclose(ssim_torch(pred, target), ssim_torch(target, pred), atol=1e-6)


def test_half_precision_is_upcast(batch):
    pred, target = batch
    got = psnr_torch(pred.half(), target.half())
    assert got.dtype == torch.float32
    assert torch.allclose(got, psnr_torch(pred.half().float(), target.half().float()))


@pytest.mark.parametrize(("pred", "target", "message"), [
    (torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 15), r"\(1, 3, 16, 16\).*\(1, 3, 16, 15\)"),
    (torch.zeros(3, 16, 16), torch.zeros(3, 16, 16), "BxCxHxW"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "float"),
])
def test_bad_inputs(pred, target, message):
    with pytest.raises(ValueError, match=message):
        psnr_torch(pred, target)
    with pytest.raises(ValueError, match=message):
        ssim_torch(pred, target)


def test_small_images_and_bad_crop():
    small = torch.rand(1, 3, 10, 40)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_torch(small, small)
    with pytest.raises(ValueError, match="crop_border"):
        psnr_torch(small, small, crop_border=5)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        psnr_torch(torch.rand(1, 2, 16, 16), torch.rand(1, 2, 16, 16), y_channel=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(batch):
    pred, target = batch
    for metric in (psnr_torch, ssim_torch):
        on_gpu = metric(pred.cuda(), target.cuda(), y_channel=True)
        assert on_gpu.device.type == "cuda"
        assert torch.allclose(on_gpu.cpu(), metric(pred, target, y_channel=True), atol=1e-5, rtol=0)


def test_image_mean_weighs_every_kept_image_once_across_batches() -> None:
    mean = ImageMean()
    mean.update(torch.tensor([1.0, 2.0, 3.0]))
    mean.update(torch.tensor([10.0, 99.0]), keep=torch.tensor([True, False]))  # 99: a sampler's padding copy
    assert mean.compute().item() == pytest.approx((1 + 2 + 3 + 10) / 4)
    assert mean.total.dtype == torch.float64 and mean.count.item() == 4
