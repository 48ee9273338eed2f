"""The data/prepare_*.py scripts on tiny generated datasets: crop grids, pairing, the DPDD sharpness filter,
refusal to overwrite, and the Rain13K checker."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import cv2
import numpy as np
import pytest

from kbnet.data.prepare import crop_positions, grid_crops, sharpest
from kbnet.imageio import Image, list_images, read_image, write_image
from tests.helpers import ROOT

DATA_DIR = ROOT / "data"


def script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DATA_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def coded(h: int, w: int, offset: int = 0) -> np.ndarray:
    """An 8-bit image whose pixels tell their position (channel 0: row, channel 1: column)."""
    rows, cols = np.mgrid[0:h, 0:w]
    return np.stack([rows, cols, np.full_like(rows, offset)], axis=2).astype(np.float32) / 255


def test_crop_positions_follow_the_official_grid():
    assert crop_positions(1000, 512, 384) == [0, 384, 488]
    assert crop_positions(512, 512, 384) == [0]
    assert crop_positions(896, 512, 384) == [0, 384]  # the flush crop coincides with a grid crop once
    assert crop_positions(1120, 512, 204) == [0, 204, 408, 608]
    assert len(grid_crops(1120, 1680, 512, 204)) == 4 * 7
    with pytest.raises(ValueError, match="cannot place"):
        crop_positions(100, 512, 384)


def test_prepare_sidd_crops_pairs_on_the_grid(tmp_path):
    src = tmp_path / "Data"
    for scene in ("0001_scene", "0002_scene"):
        write_image(src / scene / f"{scene[:4]}_NOISY_SRGB_010.png", coded(20, 14))
        write_image(src / scene / f"{scene[:4]}_GT_SRGB_010.png", coded(20, 14, offset=9))
    dst = tmp_path / "SIDD"
    sidd = script("prepare_sidd")
    assert sidd.main(["--src", str(src), "--dst", str(dst), "--patch", "8", "--overlap", "2"]) == 0
    inputs, targets = list_images(dst / "input_crops"), list_images(dst / "target_crops")
    assert [p.name for p in inputs] == [p.name for p in targets]
    assert len(inputs) == 2 * 3 * 2  # rows 0, 6, 12; columns 0, 6
    crop = read_image(dst / "input_crops" / "0001_NOISY_SRGB_010_004.png").pixels
    np.testing.assert_array_equal(crop, coded(20, 14)[6:14, 6:14])
    target = read_image(dst / "target_crops" / "0001_NOISY_SRGB_010_004.png").pixels
    np.testing.assert_array_equal(target, coded(20, 14, offset=9)[6:14, 6:14])

    with pytest.raises(FileExistsError, match="--overwrite"):
        sidd.main(["--src", str(src), "--dst", str(dst), "--patch", "8", "--overlap", "2"])
    write_image(dst / "input_crops" / "stale.png", coded(4, 4))
    sidd.main(["--src", str(src), "--dst", str(dst), "--patch", "10", "--overlap", "0", "--overwrite"])
    assert len(list_images(dst / "input_crops")) == 2 * 2 * 2
    assert not (dst / "input_crops" / "stale.png").exists()


def test_prepare_sidd_reports_unpaired_and_unknown_files(tmp_path):
    write_image(tmp_path / "Data" / "s" / "0001_NOISY_SRGB_010.png", coded(8, 8))
    args = ["--src", str(tmp_path / "Data"), "--dst", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError, match="0001_GT_SRGB_010"):
        script("prepare_sidd").main(args)
    write_image(tmp_path / "Data" / "s" / "thumbnail.png", coded(8, 8))
    with pytest.raises(ValueError, match="thumbnail.png"):
        script("prepare_sidd").main(args)


def test_prepare_dfwb_crops_large_images_and_keeps_small_ones(tmp_path):
    write_image(tmp_path / "DIV2K" / "0001.png", coded(12, 20))
    write_image(tmp_path / "BSD400" / "0001.png", coded(9, 30))
    dst = tmp_path / "DFWB"
    code = script("prepare_dfwb").main(["--src", str(tmp_path / "DIV2K"), str(tmp_path / "BSD400"),
                                        "--dst", str(dst), "--patch", "8", "--overlap", "2", "--min-side", "10"])
    assert code == 0
    names = [p.name for p in list_images(dst)]
    assert names == ["BSD400_0001.png"] + [f"DIV2K_0001_{i:03d}.png" for i in range(1, 7)]
    np.testing.assert_array_equal(read_image(dst / "DIV2K_0001_006.png").pixels, coded(12, 20)[4:12, 12:20])
    assert read_image(dst / "BSD400_0001.png").pixels.shape == (9, 30, 3)


def test_sharpness_filter_drops_the_blurriest_30_percent():
    rng = np.random.default_rng(0)
    texture = rng.random((32, 32, 3), dtype=np.float32)
    patches = [cv2.GaussianBlur(texture, (0, 0), sigma) for sigma in (0.5, 3.0, 1.0, 4.0, 0.7, 2.0, 5.0, 1.5,
                                                                       0.3, 2.5)]
    keep = sharpest(patches, drop_ratio=0.3)
    assert keep == [True, False, True, False, True, True, False, True, True, True]  # σ 3, 4, 5 dropped


def test_prepare_dpdd_writes_sharp_crops_val_centre_crops_and_8bit_test_images(tmp_path):
    src = tmp_path / "dd_dp_dataset_png"
    rng = np.random.default_rng(0)
    sharp = rng.random((16, 40, 3), dtype=np.float32)
    sharp[:, :16] = 0.5  # the left crops are flat: the least sharp
    blurry = cv2.GaussianBlur(sharp, (0, 0), 1.0)
    for split in ("train_c", "val_c", "test_c"):
        write_image(src / split / "source" / "img1.png", Image(blurry, bit_depth=16))
        write_image(src / split / "target" / "img1.png", Image(sharp, bit_depth=16))
    dst = tmp_path / "data"
    args = ["--src", str(src), "--dst", str(dst), "--patch", "8", "--stride", "4", "--val-size", "6"]
    assert script("prepare_dpdd").main(args) == 0
    # 3 rows (0, 4, 8) x 9 columns (0, 4, ..., 28, 32) = 27 crops; int(0.3 * 27) = 8 dropped
    kept = list_images(dst / "train/DPDD/target_crops")
    assert len(kept) == 27 - 8
    assert [p.name for p in kept] == [p.name for p in list_images(dst / "train/DPDD/inputC_crops")]
    dropped = {f"img1_{n:03d}.png" for n in range(1, 28)} - {p.name for p in kept}
    columns = {(int(name[5:8]) - 1) % 9 for name in dropped}
    assert columns <= {0, 1, 2}  # crops whose left edge lies in the flat region
    val = read_image(dst / "val/DPDD/target_crops/img1.png")
    assert val.pixels.shape == (6, 6, 3) and val.bit_depth == 8
    test = read_image(dst / "test/DPDD/inputC/img1.png")
    assert test.bit_depth == 8 and test.pixels.shape == (16, 40, 3)
    assert (dst / "test/DPDD/target/img1.png").is_file()


def test_prepare_gopro_flattens_sequences_and_hide(tmp_path):
    gopro, hide = tmp_path / "GOPRO_Large", tmp_path / "HIDE_dataset"
    for split in ("train", "test"):
        for seq in ("GOPR0001_00", "GOPR0002_00"):
            write_image(gopro / split / seq / "blur" / "000001.png", coded(10, 12))
            write_image(gopro / split / seq / "sharp" / "000001.png", coded(10, 12, offset=5))
    write_image(hide / "test" / "test-close-ups" / "1fromGOPR0950.png", coded(10, 12))
    write_image(hide / "GT" / "1fromGOPR0950.png", coded(10, 12, offset=5))
    dst = tmp_path / "data"
    prepare = script("prepare_gopro")
    assert prepare.main(["--gopro", str(gopro), "--hide", str(hide), "--dst", str(dst), "--val-size", "4"]) == 0
    assert [p.name for p in list_images(dst / "train/GoPro/input")] == ["GOPR0001_00_000001.png",
                                                                       "GOPR0002_00_000001.png"]
    assert len(list_images(dst / "test/GoPro/target")) == 2
    np.testing.assert_array_equal(read_image(dst / "val/GoPro/target_crops/GOPR0001_00_000001.png").pixels,
                                  coded(10, 12, offset=5)[3:7, 4:8])
    assert [p.name for p in list_images(dst / "test/HIDE/target")] == ["1fromGOPR0950.png"]
    with pytest.raises(FileExistsError):
        prepare.main(["--hide", str(hide), "--dst", str(dst)])


def test_prepare_rain13k_reports_every_problem(tmp_path, capsys):
    root = tmp_path / "data"
    for name in ("a", "b", "c"):
        write_image(root / "train/Rain13K/input" / f"{name}.jpg", coded(8, 8))
        write_image(root / "train/Rain13K/target" / f"{name}.png", coded(8, 8))
    rain = script("prepare_rain13k")
    assert rain.main(["--root", str(root), "--sets", "train/Rain13K"]) == 0
    assert "3 good pairs, 0 problem(s)" in capsys.readouterr().out

    write_image(root / "train/Rain13K/input/d.png", coded(8, 8))
    write_image(root / "train/Rain13K/target/a.png", coded(8, 9), overwrite=True)
    (root / "train/Rain13K/target/b.png").write_bytes(b"broken")
    assert rain.main(["--root", str(root), "--sets", "train/Rain13K", "test/Rain100L"]) == 1
    out = capsys.readouterr().out
    assert "train/Rain13K: 1 good pairs, 3 problem(s)" in out
    assert "input without target" in out and "d.png" in out
    assert "size mismatch" in out and "b.png" in out
    assert "test/Rain100L: 0 good pairs, 1 problem(s)" in out and "not found" in out
