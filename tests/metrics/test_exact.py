"""Exact metrics against independent computations (scikit-image, integer arithmetic) on real images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kbnet.metrics import (
    MetricTable,
    mae,
    mean_metric,
    psnr,
    rgb_to_y,
    ssim,
    ssim_dpdd,
    ssim_skimage_legacy,
    ssim_uniform,
)
from kbnet.metrics.convert import round_half_away


def _noisy(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(img + rng.normal(0.0, sigma, img.shape)), 0, 255).astype(np.uint8)


def _blurred(img: np.ndarray, sigma: float = 1.2) -> np.ndarray:
    axes = (sigma, sigma, 0) if img.ndim == 3 else sigma
    return np.clip(np.rint(gaussian_filter(img.astype(np.float64), axes)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()[100:260, 120:300]


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return data.chelsea()[50:200, 100:290]


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return data.camera()[200:360, 150:330]


def _skimage_matlab_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """scikit-image's Gaussian SSIM pads; its full map cropped by 5 px is the valid-region map."""
    kwargs = {"channel_axis": 2} if a.ndim == 3 else {}
    _, smap = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=data_range, full=True, **kwargs)
    return float(smap[5:-5, 5:-5].mean())


# ---------------------------------------------------------------- PSNR

@pytest.mark.parametrize("sigma", [5.0, 25.0])
def test_psnr_uint8_matches_skimage(astronaut, camera, sigma):
    for img in (astronaut, camera):
        noisy = _noisy(img, sigma)
        assert psnr(noisy, img) == pytest.approx(peak_signal_noise_ratio(img, noisy, data_range=255), abs=1e-10)


def test_psnr_float_matches_skimage(chelsea):
    clean = chelsea.astype(np.float32) / 255.0
    out = _blurred(chelsea).astype(np.float32) / 255.0
    expected = peak_signal_noise_ratio(clean, out, data_range=1.0)
    # scikit-image keeps float32 for the MSE; ours is float64, hence 1e-6 dB rather than bit equality
    assert psnr(out, clean) == pytest.approx(expected, abs=1e-6)
    # the uint8 values of the same images give the same PSNR with peak 255
    assert psnr(_blurred(chelsea), chelsea) == pytest.approx(expected, abs=1e-5)


def test_psnr_symmetric_and_identical(astronaut):
    noisy = _noisy(astronaut, 15)
    assert psnr(noisy, astronaut) == psnr(astronaut, noisy)
    assert psnr(astronaut, astronaut.copy()) == math.inf
    assert psnr(astronaut / 255.0, astronaut / 255.0) == math.inf


def test_crop_border_drops_border_differences(astronaut):
    damaged = astronaut.copy()
    damaged[:3] = 0
    damaged[:, -3:] = 255
    assert math.isfinite(psnr(damaged, astronaut))
    assert psnr(damaged, astronaut, crop_border=3) == math.inf
    assert ssim(damaged, astronaut, crop_border=3) == 1.0
    noisy = _noisy(astronaut, 10)
    assert psnr(noisy, astronaut, crop_border=4) == pytest.approx(psnr(noisy[4:-4, 4:-4], astronaut[4:-4, 4:-4]))


def test_torch_layouts_equal_numpy(chelsea):
    clean = chelsea.astype(np.float32) / 255.0
    out = _noisy(chelsea, 10).astype(np.float32) / 255.0
    expected = psnr(out, clean)
    chw = torch.from_numpy(out).permute(2, 0, 1)
    chw_t = torch.from_numpy(clean).permute(2, 0, 1)
    assert psnr(chw, chw_t) == pytest.approx(expected, abs=1e-12)
    assert psnr(chw[None], chw_t[None]) == pytest.approx(expected, abs=1e-12)
    assert ssim(chw[None], chw_t[None]) == pytest.approx(ssim(out, clean), abs=1e-12)
    gray = torch.from_numpy(out[..., 0])
    assert psnr(gray, torch.from_numpy(clean[..., 0])) == pytest.approx(psnr(out[..., :1], clean[..., :1]))


def test_shape_mismatch_names_both_shapes(astronaut):
    with pytest.raises(ValueError, match=r"\(160, 180, 3\).*\(160, 179, 3\)"):
        psnr(astronaut, astronaut[:, :-1])
    with pytest.raises(ValueError, match=r"\(160, 180, 3\).*\(160, 179, 3\)"):
        ssim(astronaut, astronaut[:, :-1])


@pytest.mark.parametrize(("pred", "target", "message"), [
    (np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.float32), "both as uint8"),
    (np.zeros((16, 16, 3), np.int32), np.zeros((16, 16, 3), np.int32), "dtype int32"),
    (np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16, 3)), "HxW or HxWxC"),
    (torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16), "one image"),
])
def test_bad_inputs_raise_clear_errors(pred, target, message):
    with pytest.raises(ValueError, match=message):
        psnr(pred, target)


def test_bad_crop_border():
    img = np.zeros((20, 20), np.uint8)
    with pytest.raises(ValueError, match="leaves nothing"):
        psnr(img, img, crop_border=10)
    with pytest.raises(ValueError, match="non-negative"):
        psnr(img, img, crop_border=-1)


# ---------------------------------------------------------------- SSIM

@pytest.mark.parametrize("degrade", ["noise", "blur"])
def test_ssim_uint8_matches_skimage_valid_region(astronaut, camera, degrade):
    for img in (astronaut, camera):
        out = _noisy(img, 20) if degrade == "noise" else _blurred(img)
        assert ssim(out, img) == pytest.approx(_skimage_matlab_ssim(out, img, 255), abs=1e-10)


def test_ssim_float_matches_skimage_and_uint8(chelsea):
    out8 = _noisy(chelsea, 12)
    out, clean = out8 / 255.0, chelsea / 255.0
    assert ssim(out, clean) == pytest.approx(_skimage_matlab_ssim(out, clean, 1.0), abs=1e-10)
    # SSIM is scale-invariant when L scales with the data: uint8 with L=255 equals float with L=1
    assert ssim(out8, chelsea) == pytest.approx(ssim(out, clean), abs=1e-10)


def test_ssim_is_channel_mean(chelsea):
    out = _noisy(chelsea, 20)
    per_channel = [ssim(out[..., c], chelsea[..., c]) for c in range(3)]
    assert ssim(out, chelsea) == pytest.approx(np.mean(per_channel), abs=1e-12)
    assert len(set(np.round(per_channel, 6))) == 3


def test_ssim_identity_symmetry_and_order(astronaut):
    assert ssim(astronaut, astronaut.copy()) == 1.0
    light, heavy = _noisy(astronaut, 5), _noisy(astronaut, 30)
    assert ssim(light, astronaut) == pytest.approx(ssim(astronaut, light), abs=1e-14)
    assert ssim(astronaut, heavy) < ssim(astronaut, light) < 1.0


def test_ssim_too_small_raises():
    img = np.zeros((10, 30), np.uint8)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(img, img)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8), crop_border=5)


# ---------------------------------------------------------------- MATLAB rgb2ycbcr Y

@pytest.mark.parametrize(("rgb", "y"), [
    ((255, 255, 255), 235), ((0, 0, 0), 16), ((255, 0, 0), 81), ((0, 255, 0), 145), ((0, 0, 255), 41),
    ((128, 128, 128), 126),
])
def test_rgb_to_y_known_values(rgb, y):
    px = np.array(rgb, np.uint8).reshape(1, 1, 3)
    assert rgb_to_y(px).dtype == np.uint8
    assert rgb_to_y(px)[0, 0, 0] == y
    assert rgb_to_y(px / 255.0)[0, 0, 0] == pytest.approx((16 + (65.481 * rgb[0] + 128.553 * rgb[1]
                                                                  + 24.966 * rgb[2]) / 255) / 255, abs=1e-12)


def test_rgb_to_y_rounds_half_away_from_zero():
    # MATLAB's double arithmetic gives exactly 52.5 for this triple; numpy's rint would give 52.
    px = np.array([6, 34, 182], np.uint8).reshape(1, 1, 3)
    assert rgb_to_y(px)[0, 0, 0] == 53
    assert list(round_half_away(np.array([-2.5, -0.5, 0.5, 1.5, 2.5, 2.4999]))) == [-3, -1, 1, 2, 3, 2]


def test_rgb_to_y_matches_integer_arithmetic():
    """Away from exact half-integers, Y equals round(16 + (65481 R + 128553 G + 24966 B) / 255000)."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(400, 500, 3)).astype(np.uint8)
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    n = 65481 * r + 128553 * g + 24966 * b
    expected = 16 + (n + 127500) // 255000
    not_tie = n % 255000 != 127500
    assert np.array_equal(rgb_to_y(rgb)[..., 0][not_tie], expected[not_tie])


def test_y_channel_metrics_use_rounded_y(astronaut):
    out = _noisy(astronaut, 15)
    y_out, y_ref = rgb_to_y(out), rgb_to_y(astronaut)
    assert psnr(out, astronaut, y_channel=True) == pytest.approx(psnr(y_out, y_ref), abs=1e-12)
    assert ssim(out, astronaut, y_channel=True) == pytest.approx(
        _skimage_matlab_ssim(y_out[..., 0], y_ref[..., 0], 255), abs=1e-10)
    # gray images pass through unchanged, as in the MATLAB script
    assert psnr(out[..., 0], astronaut[..., 0], y_channel=True) == psnr(out[..., 0], astronaut[..., 0])
    with pytest.raises(ValueError, match="Y channel"):
        psnr(np.zeros((16, 16, 4), np.uint8), np.zeros((16, 16, 4), np.uint8), y_channel=True)


# ---------------------------------------------------------------- legacy conventions and MAE

def test_ssim_skimage_legacy_matches_old_defaults(chelsea, camera):
    for img in (chelsea, camera):
        out, clean = _noisy(img, 15).astype(np.float32) / 255, img.astype(np.float32) / 255
        kwargs = {"channel_axis": 2} if img.ndim == 3 else {}
        # scikit-image >= 0.19 computes float32 input in float32; ours (like 0.18 and older) in float64
        expected = structural_similarity(clean.astype(np.float64), out.astype(np.float64), data_range=2.0,
                                         win_size=7, **kwargs)
        assert ssim_skimage_legacy(out, clean) == pytest.approx(expected, abs=1e-10)
        expected32 = structural_similarity(clean, out, data_range=2.0, win_size=7, **kwargs)
        assert ssim_skimage_legacy(out, clean) == pytest.approx(expected32, abs=1e-6)
        assert ssim_skimage_legacy(out, clean) > ssim(out, clean)
    out8 = _noisy(chelsea, 15)
    assert ssim_skimage_legacy(out8, chelsea) == pytest.approx(
        structural_similarity(chelsea, out8, channel_axis=2), abs=1e-10)


def test_ssim_dpdd_matches_skimage(astronaut):
    out, clean = _blurred(astronaut, 2.0) / 255.0, astronaut / 255.0
    expected = structural_similarity(clean, out, data_range=1.0, channel_axis=2)
    assert ssim_dpdd(out, clean) == pytest.approx(expected, abs=1e-10)
    assert ssim_uniform(out, clean, data_range=1.0, win_size=9) == pytest.approx(
        structural_similarity(clean, out, data_range=1.0, channel_axis=2, win_size=9), abs=1e-10)
    with pytest.raises(ValueError, match="odd"):
        ssim_uniform(out, clean, data_range=1.0, win_size=8)
    with pytest.raises(ValueError, match="at least that large"):
        ssim_dpdd(out[:6], clean[:6])


def test_mae_is_per_channel_mean_on_unit_scale(chelsea):
    out8 = _noisy(chelsea, 10)
    out, clean = out8 / 255.0, chelsea / 255.0
    per_channel = [np.abs(out[..., c] - clean[..., c]).mean() for c in range(3)]
    assert mae(out, clean) == pytest.approx(np.mean(per_channel), abs=1e-14)
    assert mae(out8, chelsea) == pytest.approx(mae(out, clean), abs=1e-14)
    assert mae(out, out) == 0.0


# ---------------------------------------------------------------- aggregation

def test_mean_metric():
    assert mean_metric([30.0, 32.0, 34.5]) == pytest.approx(32.166666666666664)
    assert mean_metric([30.0, math.inf]) == math.inf
    with pytest.raises(ValueError, match="no values"):
        mean_metric([], "psnr")
    with pytest.raises(ValueError, match="1 of 2 values are NaN"):
        mean_metric([1.0, math.nan])


def test_per_image_mean_differs_from_pooled_psnr(astronaut):
    """The paper protocol averages per-image PSNR; pooling the MSE first gives another number."""
    light, heavy = _noisy(astronaut, 3), _noisy(astronaut, 40)
    per_image = mean_metric([psnr(light, astronaut), psnr(heavy, astronaut)])
    pooled = psnr(np.concatenate([light, heavy]), np.concatenate([astronaut, astronaut]))
    assert per_image - pooled > 1.0


def test_metric_table_reports(tmp_path):
    table = MetricTable(metrics=("psnr", "ssim"), labels=("result", "target"), meta={"y_channel": True})
    table.add(result="a.png", target="a.png", psnr=30.0, ssim=0.9)
    table.add(result="b.png", target="b.png", psnr=math.inf, ssim=1.0)
    table.add(result="c.png", target="c.png", psnr=32.0, ssim=0.8)
    assert table.means()["ssim"] == pytest.approx(0.9)
    assert "inf" in table.render() and "mean (3 images)" in table.render()
    with pytest.raises(ValueError, match="row keys"):
        table.add(result="d.png", psnr=1.0, ssim=1.0)
    paths = table.write_reports(tmp_path / "out" / "scores.csv")
    assert [p.name for p in paths] == ["scores.csv", "scores.json", "scores.md"]
    report = json.loads(paths[1].read_text())
    assert report["mean"]["psnr"] == "inf" and report["count"] == 3 and report["y_channel"] is True
    assert report["images"][0] == {"result": "a.png", "target": "a.png", "psnr": 30.0, "ssim": 0.9}
    csv_lines = paths[0].read_text().splitlines()
    assert csv_lines[0] == "result,target,psnr,ssim" and csv_lines[-1].startswith("mean (3 images)")
    assert "| **mean (3 images)** |" in paths[2].read_text()
    with pytest.raises(FileExistsError, match="scores.csv"):
        table.write_reports(tmp_path / "out" / "scores")
    table.write_reports(tmp_path / "out" / "scores", overwrite=True)
