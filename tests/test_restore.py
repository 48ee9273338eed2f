"""The kbnet-restore CLI: formats and bit depths, gray and alpha, comparison images, tiling, and every bad input."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from kbnet.imageio import read_image, to_integer
from kbnet.inference import Restorer, profile_model
from kbnet.inference import restorer as restorer_module
from kbnet.inference.memory import host_bytes
from kbnet.restore import main
from tests.helpers.checkpoints import save_official_checkpoint, save_project_checkpoint
from tests.helpers.images import write_rgb

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread avoids OpenMP spin-waits


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 40x56 RGB crop of scikit-image's astronaut, uint8."""
    return np.ascontiguousarray(skimage.data.astronaut()[100:140, 180:236])


@pytest.fixture
def color_ckpt(tmp_path) -> tuple[Path, torch.nn.Module]:
    path = tmp_path / "color.ckpt"
    return path, save_project_checkpoint(path, "kbnet_s_tiny", width=8)


@pytest.fixture
def gray_ckpt(tmp_path) -> tuple[Path, torch.nn.Module]:
    path = tmp_path / "gray.ckpt"
    return path, save_project_checkpoint(path, "kbnet_s_tiny", width=8, img_channel=1)


def read_raw(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def expected_output(net: torch.nn.Module, pixels: np.ndarray, **restorer_args) -> np.ndarray:
    """What the CLI should produce before quantization: the Restorer's clamped float output, H x W x C."""
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].float()
    out = Restorer(net, **{"tile": None, **restorer_args})(x).clamp(0, 1)
    return out[0].permute(1, 2, 0).numpy()


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


# ------------------------------------------------------------------------------------------------ formats
def test_8bit_png_round_trip(tmp_path, photo, color_ckpt, capsys):
    ckpt, net = color_ckpt
    src = write_rgb(tmp_path / "photo.png", photo)
    assert run_cli(src, "-c", ckpt, "-o", tmp_path / "out") == 0
    out = read_image(tmp_path / "out" / "photo.png")
    assert out.bit_depth == 8 and out.pixels.shape == (40, 56, 3)
    expected = to_integer(expected_output(net, photo.astype(np.float32) / 255), 8)
    assert np.array_equal(to_integer(out.pixels, 8), expected)
    assert "photo.png" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_input_gives_16bit_output(tmp_path, photo, color_ckpt, suffix):
    ckpt, net = color_ckpt
    src = write_rgb(tmp_path / f"deep{suffix}", photo.astype(np.uint16) * 257 + 100)
    assert run_cli(src, "-c", ckpt, "-o", tmp_path / "out", "-q") == 0
    raw = read_raw(tmp_path / "out" / f"deep{suffix}")
    assert raw.dtype == np.uint16 and raw.shape == (40, 56, 3)
    expected = to_integer(expected_output(net, read_image(src).pixels), 16)
    assert np.array_equal(raw[:, :, ::-1], expected)


def test_format_and_bit_depth_options(tmp_path, photo, color_ckpt):
    ckpt, _ = color_ckpt
    src = write_rgb(tmp_path / "photo.png", photo)
    assert run_cli(src, "-c", ckpt, "-o", tmp_path / "tif16", "--format", "tif", "--bit-depth", "16", "-q") == 0
    assert read_raw(tmp_path / "tif16" / "photo.tif").dtype == np.uint16
    assert run_cli(src, "-c", ckpt, "-o", tmp_path / "jpg", "--format", "jpg", "-q") == 0
    assert read_image(tmp_path / "jpg" / "photo.jpg").pixels.shape == (40, 56, 3)


def test_jpeg_input(tmp_path, photo, color_ckpt):
    ckpt, _ = color_ckpt
    src = write_rgb(tmp_path / "photo.jpg", photo)
    assert run_cli(src, "-c", ckpt, "-o", tmp_path / "out", "-q") == 0
    assert read_raw(tmp_path / "out" / "photo.jpg").dtype == np.uint8


# ------------------------------------------------------------------------------------------- gray and alpha
def test_gray_image_with_a_gray_model(tmp_path, photo, gray_ckpt):
    ckpt, net = gray_ckpt
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    src = tmp_path / "gray.png"
    cv2.imwrite(str(src), gray)
    assert run_cli(src, "-c", ckpt, "-o", tmp_path / "out", "-q") == 0
    raw = read_raw(tmp_path / "out" / "gray.png")
    assert raw.shape == (40, 56)
    expected = to_integer(expected_output(net, gray[:, :, None].astype(np.float32) / 255), 8)
    assert np.array_equal(raw[:, :, None], expected)


def test_channel_mismatch_is_refused_unless_converted(tmp_path, photo, color_ckpt, gray_ckpt, capsys):
    color, _ = color_ckpt
    gray_model, _ = gray_ckpt
    gray_src = tmp_path / "gray.png"
    cv2.imwrite(str(gray_src), cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY))
    assert run_cli(gray_src, "-c", color, "-o", tmp_path / "a", "-q") == 2
    err = capsys.readouterr().err
    assert "gray.png" in err and "3-channel" in err and "--convert-channels" in err
    assert not (tmp_path / "a" / "gray.png").exists()
    assert run_cli(gray_src, "-c", color, "-o", tmp_path / "a", "-q", "--convert-channels") == 0
    assert read_raw(tmp_path / "a" / "gray.png").ndim == 2  # the result keeps the input's channel count
    color_src = write_rgb(tmp_path / "color.png", photo)
    assert run_cli(color_src, "-c", gray_model, "-o", tmp_path / "b", "-q") == 2
    assert "1-channel" in capsys.readouterr().err


def test_alpha_plane_is_kept(tmp_path, photo, color_ckpt):
    ckpt, net = color_ckpt
    alpha = np.tile(np.linspace(0, 255, 56, dtype=np.uint8), (40, 1))
    src = write_rgb(tmp_path / "rgba.png", np.dstack([photo, alpha]))
    assert run_cli(src, "-c", ckpt, "-o", tmp_path / "out", "-q") == 0
    raw = read_raw(tmp_path / "out" / "rgba.png")
    assert raw.shape == (40, 56, 4)
    assert np.array_equal(raw[:, :, 3], alpha)
    expected = to_integer(expected_output(net, photo.astype(np.float32) / 255), 8)
    assert np.array_equal(raw[:, :, 2::-1], expected)


# -------------------------------------------------------------------------------- comparison and options
def test_target_gives_a_side_by_side_image_and_psnr(tmp_path, photo, color_ckpt, capsys):
    ckpt, _ = color_ckpt
    noisy = np.clip(photo.astype(int) + np.random.default_rng(0).integers(-20, 21, photo.shape), 0, 255)
    src = write_rgb(tmp_path / "noisy.png", noisy.astype(np.uint8))
    target = write_rgb(tmp_path / "clean.png", photo)
    assert run_cli(src, "-c", ckpt, "-o", tmp_path / "out", "--target", target) == 0
    compare = read_image(tmp_path / "out" / "noisy_compare.png").pixels
    restored = read_image(tmp_path / "out" / "noisy.png").pixels
    assert compare.shape == (40, 3 * 56 + 2 * 4, 3)
    assert np.array_equal(to_integer(compare[:, :56], 8), noisy.astype(np.uint8))
    assert np.array_equal(to_integer(compare[:, 60:116], 8), to_integer(restored, 8))
    assert np.array_equal(to_integer(compare[:, 120:], 8), photo)
    assert "clean.png: input" in capsys.readouterr().err


def test_folders_in_with_a_folder_of_targets(tmp_path, photo, color_ckpt):
    ckpt, _ = color_ckpt
    (tmp_path / "in").mkdir()
    (tmp_path / "gt").mkdir()
    for name in ("a", "b"):
        write_rgb(tmp_path / "in" / f"{name}.png", photo)
        write_rgb(tmp_path / "gt" / f"{name}.png", photo)
    assert run_cli(tmp_path / "in", "-c", ckpt, "-o", tmp_path / "out", "--target", tmp_path / "gt", "-q") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "a_compare.png", "b.png", "b_compare.png"]


def test_side_by_side_without_target(tmp_path, photo, color_ckpt):
    ckpt, _ = color_ckpt
    src = write_rgb(tmp_path / "photo.png", photo)
    assert run_cli(src, "-c", ckpt, "-o", tmp_path / "out", "--side-by-side", "-q") == 0
    assert read_image(tmp_path / "out" / "photo_compare.png").pixels.shape == (40, 2 * 56 + 4, 3)


def test_tiling_and_self_ensemble_options_reach_the_restorer(tmp_path, photo, color_ckpt):
    ckpt, net = color_ckpt
    src = write_rgb(tmp_path / "photo.png", photo)
    pixels = photo.astype(np.float32) / 255
    assert run_cli(src, "-c", ckpt, "-o", tmp_path / "tiled", "--tile", "32", "--tile-overlap", "8", "-q") == 0
    expected = to_integer(expected_output(net, pixels, tile=32, tile_overlap=8), 8)
    assert np.array_equal(to_integer(read_image(tmp_path / "tiled" / "photo.png").pixels, 8), expected)
    assert run_cli(src, "-c", ckpt, "-o", tmp_path / "ens", "--self-ensemble", "-q") == 0
    expected = to_integer(expected_output(net, pixels, self_ensemble=True), 8)
    assert np.array_equal(to_integer(read_image(tmp_path / "ens" / "photo.png").pixels, 8), expected)


def test_memory_budget_tiles_automatically(tmp_path, photo, color_ckpt, capsys, monkeypatch):
    ckpt, net = color_ckpt
    monkeypatch.setattr(restorer_module, "memory_in_use", lambda device: 0)  # the process's RSS varies
    src = write_rgb(tmp_path / "big.png", cv2.resize(photo, (160, 120)))
    budget = profile_model(net, 3).peak(64, 64) + host_bytes(3, 120, 160) + 2**10  # room for a 64, not a 72 tile
    args = ("-c", ckpt, "--tile-overlap", "16", "--max-memory-gb", f"{budget / 2**30:.6f}")
    assert run_cli(src, "-o", tmp_path / "out", *args) == 0
    assert "big.png (9 tiles)" in capsys.readouterr().err  # rows start at 0, 48, 56; columns at 0, 48, 96
    expected = to_integer(expected_output(net, read_image(src).pixels, tile=64, tile_overlap=16), 8)
    assert np.array_equal(to_integer(read_image(tmp_path / "out" / "big.png").pixels, 8), expected)
    err = error_of(capsys, src, "-o", tmp_path / "none", "-c", ckpt, "--max-memory-gb", "0.4", "-q")
    assert "too small" in err and "--max-memory-gb" in err


def test_official_weights_with_their_preset(tmp_path, photo):
    ckpt = tmp_path / "official.pth"
    net = save_official_checkpoint(ckpt, "kbnet_l_tiny", wrapper="params")
    src = write_rgb(tmp_path / "photo.png", photo)
    assert run_cli(src, "-c", ckpt, "-m", "kbnet_l_tiny", "-o", tmp_path / "out", "-q") == 0
    expected = to_integer(expected_output(net, photo.astype(np.float32) / 255), 8)
    assert np.array_equal(to_integer(read_image(tmp_path / "out" / "photo.png").pixels, 8), expected)


# ------------------------------------------------------------------------------------------------ bad input
def error_of(capsys, *args) -> str:
    assert run_cli(*args) == 2
    return capsys.readouterr().err


def test_unreadable_image_names_the_file(tmp_path, color_ckpt, capsys):
    ckpt, _ = color_ckpt
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert "broken.png" in error_of(capsys, bad, "-c", ckpt, "-o", tmp_path / "out", "-q")


def test_missing_input_and_empty_folder(tmp_path, color_ckpt, capsys):
    ckpt, _ = color_ckpt
    assert "input not found" in error_of(capsys, tmp_path / "nope.png", "-c", ckpt, "-o", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    err = error_of(capsys, tmp_path / "empty", "-c", ckpt, "-o", tmp_path / "out")
    assert "no images" in err and "empty" in err


def test_target_of_another_size_names_both_files(tmp_path, photo, color_ckpt, capsys):
    ckpt, _ = color_ckpt
    src = write_rgb(tmp_path / "photo.png", photo)
    target = write_rgb(tmp_path / "small.png", photo[:32, :32])
    err = error_of(capsys, src, "-c", ckpt, "-o", tmp_path / "out", "--target", target, "-q")
    assert "size mismatch" in err and "small.png" in err and "photo.png" in err
    assert not (tmp_path / "out" / "photo.png").exists()


def test_checkpoint_for_another_preset(tmp_path, photo, color_ckpt, capsys):
    ckpt, _ = color_ckpt
    src = write_rgb(tmp_path / "photo.png", photo)
    err = error_of(capsys, src, "-c", ckpt, "-m", "kbnet_l_tiny", "-o", tmp_path / "out")
    assert "kbnet_s_tiny" in err and "kbnet_l_tiny" in err
    official = tmp_path / "official.pth"
    save_official_checkpoint(official, "kbnet_s_tiny")
    err = error_of(capsys, src, "-c", official, "-m", "kbnet_l_tiny", "-o", tmp_path / "out")
    assert "official.pth" in err and "does not fit KBNetL" in err
    assert "--model" in error_of(capsys, src, "-c", official, "-o", tmp_path / "out")


def test_outputs_never_replace_inputs(tmp_path, photo, color_ckpt, capsys):
    ckpt, _ = color_ckpt
    (tmp_path / "in").mkdir()
    src = write_rgb(tmp_path / "in" / "photo.png", photo)
    before = src.read_bytes()
    assert "also an input folder" in error_of(capsys, tmp_path / "in", "-c", ckpt, "-o", tmp_path / "in")
    assert "input or target" in error_of(capsys, src, "-c", ckpt, "-o", tmp_path / "in")
    assert src.read_bytes() == before


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, photo, color_ckpt, capsys):
    ckpt, _ = color_ckpt
    src = write_rgb(tmp_path / "photo.png", photo)
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo.png").write_bytes(b"precious")
    assert "--overwrite" in error_of(capsys, src, "-c", ckpt, "-o", out, "-q")
    assert (out / "photo.png").read_bytes() == b"precious"
    assert run_cli(src, "-c", ckpt, "-o", out, "-q", "--overwrite") == 0
    assert read_image(out / "photo.png").pixels.shape == (40, 56, 3)


def test_colliding_output_names(tmp_path, photo, color_ckpt, capsys):
    ckpt, _ = color_ckpt
    a = write_rgb(tmp_path / "photo.png", photo)
    b = write_rgb(tmp_path / "photo.tif", photo)
    assert "both be written" in error_of(capsys, a, b, "-c", ckpt, "-o", tmp_path / "out", "--format", "png")


def test_missing_or_broken_checkpoint(tmp_path, photo, capsys):
    src = write_rgb(tmp_path / "photo.png", photo)
    assert "checkpoint not found" in error_of(capsys, src, "-c", tmp_path / "none.ckpt", "-o", tmp_path / "out")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"garbage")
    assert "broken.ckpt" in error_of(capsys, src, "-c", broken, "-m", "kbnet_s_tiny", "-o", tmp_path / "out")


def test_python_dash_m_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kbnet-restore", "--help"])
    monkeypatch.delitem(sys.modules, "kbnet.restore")
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("kbnet.restore", run_name="__main__")
    assert exc.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out
