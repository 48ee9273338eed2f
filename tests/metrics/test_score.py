"""Scoring folders of real PNG files, as the MATLAB evaluate_PSNR_SSIM.m script does, and every error case."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from kbnet.imageio import ImageReadError
from kbnet.metrics import psnr, ssim
from kbnet.metrics.score import main, pair_by_name, read_uint8, score_folders
from tests.helpers import ROOT
from tests.helpers.images import write_rgb


def _degrade(img: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(img + rng.normal(0, sigma, img.shape)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clean_images() -> dict[str, np.ndarray]:
    return {"rain-1": data.astronaut()[:96, :128], "rain-2": data.chelsea()[:96, :128],
            "rain-10": data.coffee()[:96, :128]}


@pytest.fixture
def folders(tmp_path, clean_images) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """targets/<stem>.png and results/<stem>-kbnet_l.png, as the deraining test script names its outputs."""
    results = {}
    for i, (stem, img) in enumerate(clean_images.items()):
        write_rgb(tmp_path / "targets" / f"{stem}.png", img)
        results[stem] = _degrade(img, 5 + 10 * i, seed=i)
        write_rgb(tmp_path / "results" / f"{stem}-kbnet_l.png", results[stem])
    return tmp_path / "results", tmp_path / "targets", results


def test_read_uint8_is_exact(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3)).astype(np.uint8)
    write_rgb(tmp_path / "x.png", rgb)
    assert np.array_equal(read_uint8(tmp_path / "x.png"), rgb)
    gray = rgb[..., 0]
    write_rgb(tmp_path / "g.png", gray)
    assert np.array_equal(read_uint8(tmp_path / "g.png"), gray[..., None])


@pytest.mark.parametrize("y_channel", [True, False])
def test_score_by_name_matches_direct_metrics(folders, clean_images, y_channel):
    results_dir, targets_dir, results = folders
    table = score_folders(results_dir, targets_dir, y_channel=y_channel, crop_border=2)
    assert [(r["result"], r["target"]) for r in table.rows] == [
        ("rain-1-kbnet_l.png", "rain-1.png"), ("rain-10-kbnet_l.png", "rain-10.png"),
        ("rain-2-kbnet_l.png", "rain-2.png")]
    for row in table.rows:
        stem = row["target"].removesuffix(".png")
        assert row["psnr"] == psnr(results[stem], clean_images[stem], crop_border=2, y_channel=y_channel)
        assert row["ssim"] == ssim(results[stem], clean_images[stem], crop_border=2, y_channel=y_channel)
    means = table.means()
    assert means["psnr"] == pytest.approx(np.mean([r["psnr"] for r in table.rows]))
    assert table.meta["y_channel"] is y_channel


def test_score_sorted_pairs_by_order(tmp_path, clean_images):
    stems = sorted(clean_images)
    for i, stem in enumerate(stems):
        write_rgb(tmp_path / "gt" / f"gt_{i:03d}.png", clean_images[stem])
        write_rgb(tmp_path / "out" / f"{i:03d}_restored.png", _degrade(clean_images[stem], 8, i))
    table = score_folders(tmp_path / "out", tmp_path / "gt", y_channel=True, pairing="sorted")
    assert [(r["result"], r["target"]) for r in table.rows] == [
        (f"{i:03d}_restored.png", f"gt_{i:03d}.png") for i in range(3)]
    assert all(25 < r["psnr"] < 60 for r in table.rows)
    with pytest.raises(ValueError, match="unmatched files when pairing by name"):
        score_folders(tmp_path / "out", tmp_path / "gt", y_channel=True, pairing="name")


def test_identical_folders_score_inf(tmp_path, clean_images):
    for stem, img in clean_images.items():
        write_rgb(tmp_path / "a" / f"{stem}.png", img)
    table = score_folders(tmp_path / "a", tmp_path / "a", y_channel=False)
    assert all(math.isinf(r["psnr"]) and r["ssim"] == 1.0 for r in table.rows)


def test_pair_by_name_rules():
    targets = [Path("1.png"), Path("10.png"), Path("a-b.jpg"), Path("a.png")]
    results = [Path("10-x.png"), Path("1.png"), Path("a-b-kbnet.png"), Path("a-kbnet.png")]
    assert {r.name: t.name for r, t in pair_by_name(results, targets)} == {
        "10-x.png": "10.png", "1.png": "1.png", "a-b-kbnet.png": "a-b.jpg", "a-kbnet.png": "a.png"}
    with pytest.raises(ValueError, match="both match target 1.png"):
        pair_by_name([Path("1.png"), Path("1-x.png")], [Path("1.png")])
    with pytest.raises(ValueError, match="two targets share the stem 'a'"):
        pair_by_name([Path("a.png")], [Path("a.jpg"), Path("a.png")])


def test_unmatched_files_are_listed(folders):
    results_dir, targets_dir, _ = folders
    (results_dir / "rain-2-kbnet_l.png").rename(results_dir / "other.png")
    with pytest.raises(ValueError, match=r"1 result\(s\) without a partner: other.png.*"
                                         r"1 target\(s\) without a partner: rain-2.png"):
        score_folders(results_dir, targets_dir, y_channel=True)
    (results_dir / "other.png").unlink()
    with pytest.raises(ValueError, match=r"2 results vs 3 targets.*target\(s\) without a partner: rain-2.png"):
        score_folders(results_dir, targets_dir, y_channel=True, pairing="sorted")


def test_empty_folder(tmp_path, folders):
    _, targets_dir, _ = folders
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        score_folders(tmp_path / "empty", targets_dir, y_channel=True)
    with pytest.raises(FileNotFoundError, match="missing"):
        score_folders(tmp_path / "missing", targets_dir, y_channel=True)


def test_size_mismatch_names_both_files(folders, clean_images):
    results_dir, targets_dir, results = folders
    write_rgb(results_dir / "rain-2-kbnet_l.png", results["rain-2"][:90])
    with pytest.raises(ValueError, match=r"rain-2-kbnet_l.png is 128x90 .*/rain-2.png is 128x96"):
        score_folders(results_dir, targets_dir, y_channel=True)


def test_unreadable_and_16bit_files(folders):
    results_dir, targets_dir, results = folders
    (results_dir / "rain-1-kbnet_l.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="rain-1-kbnet_l.png"):
        score_folders(results_dir, targets_dir, y_channel=True)
    cv2.imwrite(str(results_dir / "rain-1-kbnet_l.png"), results["rain-1"].astype(np.uint16) * 257)
    with pytest.raises(ImageReadError, match="rain-1-kbnet_l.png: is a 16-bit image"):
        score_folders(results_dir, targets_dir, y_channel=True)


def test_too_small_for_ssim_names_the_pair(tmp_path):
    tiny = np.zeros((8, 8, 3), np.uint8)
    write_rgb(tmp_path / "r" / "x.png", tiny)
    write_rgb(tmp_path / "t" / "x.png", tiny)
    with pytest.raises(ValueError, match=r"cannot score .*x.png against .*x.png: SSIM needs"):
        score_folders(tmp_path / "r", tmp_path / "t", y_channel=False)


def test_cli_writes_reports_and_refuses_overwrite(folders, tmp_path, capsys):
    results_dir, targets_dir, _ = folders
    out = tmp_path / "reports" / "derain.csv"
    argv = [str(results_dir), str(targets_dir), "--y-channel", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Y (MATLAB rgb2ycbcr)" in printed and "mean (3 images)" in printed and "rain-10-kbnet_l.png" in printed
    report = json.loads((tmp_path / "reports" / "derain.json").read_text())
    assert report["count"] == 3 and report["pairing"] == "name" and report["y_channel"] is True
    table = score_folders(results_dir, targets_dir, y_channel=True)
    assert report["mean"]["psnr"] == pytest.approx(table.means()["psnr"], abs=1e-12)
    assert (tmp_path / "reports" / "derain.md").is_file()
    before = out.read_text()
    assert main(argv) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert out.read_text() == before
    assert main([*argv, "--overwrite", "--crop-border", "4"]) == 0
    assert out.read_text() != before


def test_cli_reports_errors(tmp_path, folders, capsys):
    _, targets_dir, _ = folders
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(targets_dir)]) == 2
    assert "no images" in capsys.readouterr().err


def test_module_entry_point(folders):
    results_dir, targets_dir, _ = folders
    proc = subprocess.run([sys.executable, "-m", "kbnet.metrics.score", str(results_dir), str(targets_dir),
                           "--pairing", "name"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mean (3 images)" in proc.stdout and "RGB" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr
