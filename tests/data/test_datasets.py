"""Datasets on real files in tmp_path: pairing, errors, the Gaussian test protocol, SIDD .mat blocks, labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from kbnet.data.datasets import (
    CleanImageDataset,
    DatasetError,
    DatasetNotFoundError,
    GaussianNoiseDataset,
    PairedImageDataset,
    SIDDBlocksDataset,
    mean_input_psnr,
    natural_key,
)
from kbnet.data.degradations import add_gaussian_noise, gaussian_noise_like, validation_sigma
from kbnet.imageio import ImageReadError, write_image


def random_image(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.round(np.random.default_rng(seed).random((h, w, c)) * 255).astype(np.float32) / 255


def make_pairs(root: Path, names: list[str], size: tuple[int, int] = (12, 10)) -> tuple[Path, Path]:
    inp, tgt = root / "input", root / "target"
    for i, name in enumerate(names):
        img = random_image(*size, seed=i)
        write_image(inp / f"{name}.png", img)
        write_image(tgt / f"{name}.png", 1.0 - img)
    return inp, tgt


def test_paired_folders_give_whole_aligned_images_in_natural_order(tmp_path):
    inp, tgt = make_pairs(tmp_path, ["img10", "img2", "img1"])
    dataset = PairedImageDataset(inp, tgt)
    assert len(dataset) == 3
    names = [dataset[i]["name"] for i in range(3)]
    assert names == ["img1", "img2", "img10"]
    sample = dataset[0]
    assert sample["input"].shape == (3, 12, 10) and sample["input"].dtype == torch.float32
    torch.testing.assert_close(sample["target"], 1.0 - sample["input"], atol=1e-6, rtol=0)


def test_pairs_match_by_stem_across_extensions_and_training_crops(tmp_path):
    img = random_image(20, 30)
    write_image(tmp_path / "in" / "a.png", img)
    write_image(tmp_path / "gt" / "a.tif", img)
    dataset = PairedImageDataset(tmp_path / "in", tmp_path / "gt", patch_size=8, repeat=3)
    assert len(dataset) == 3
    sample = dataset[2]
    assert sample["input"].shape == (3, 8, 8)
    torch.testing.assert_close(sample["input"], sample["target"])


def test_gray_conversion(tmp_path):
    inp, tgt = make_pairs(tmp_path, ["a"])
    assert PairedImageDataset(inp, tgt, channels=1)[0]["input"].shape == (1, 12, 10)


def test_unpaired_files_are_listed(tmp_path):
    inp, tgt = make_pairs(tmp_path, ["a", "b"])
    write_image(inp / "only_input.png", random_image(4, 4))
    write_image(tgt / "only_target.png", random_image(4, 4))
    with pytest.raises(DatasetError) as err:
        PairedImageDataset(inp, tgt)
    assert "only_input" in str(err.value) and "only_target" in str(err.value)


def test_size_mismatch_names_both_files(tmp_path):
    write_image(tmp_path / "in" / "a.png", random_image(8, 8))
    write_image(tmp_path / "gt" / "a.png", random_image(8, 9))
    dataset = PairedImageDataset(tmp_path / "in", tmp_path / "gt")
    with pytest.raises(DatasetError, match="size mismatch") as err:
        dataset[0]
    message = str(err.value)
    assert str(tmp_path / "in" / "a.png") in message and str(tmp_path / "gt" / "a.png") in message
    assert "8x8" in message and "9x8" in message


def test_unreadable_image_names_the_file(tmp_path):
    inp, tgt = make_pairs(tmp_path, ["a"])
    (inp / "a.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="a.png"):
        PairedImageDataset(inp, tgt)[0]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not found"):
        CleanImageDataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images"):
        CleanImageDataset(tmp_path / "empty")


def test_two_files_with_one_stem_are_an_error(tmp_path):
    write_image(tmp_path / "a.png", random_image(4, 4))
    write_image(tmp_path / "a.tif", random_image(4, 4))
    with pytest.raises(DatasetError, match="share the name"):
        CleanImageDataset(tmp_path)


def test_labels_select_pairs_by_one_based_natural_index(tmp_path):
    inp, tgt = make_pairs(tmp_path, ["s1", "s2", "s3", "s10"])
    np.save(tmp_path / "labels.npy", np.array([1, 4]))
    dataset = PairedImageDataset(inp, tgt, labels=tmp_path / "labels.npy")
    assert [dataset[i]["name"] for i in range(len(dataset))] == ["s1", "s10"]


@pytest.mark.parametrize("labels", [np.array([0, 1]), np.array([5]), np.array([1, 1]), np.array([1.5])])
def test_bad_labels(tmp_path, labels):
    inp, tgt = make_pairs(tmp_path, ["a", "b"])
    np.save(tmp_path / "labels.npy", labels)
    with pytest.raises(DatasetError, match=r"labels\.npy"):
        PairedImageDataset(inp, tgt, labels=tmp_path / "labels.npy")


def test_clean_dataset_input_equals_target(tmp_path):
    write_image(tmp_path / "a.png", random_image(16, 16))
    sample = CleanImageDataset(tmp_path, patch_size=8)[0]
    assert torch.equal(sample["input"], sample["target"])
    assert sample["input"].data_ptr() != sample["target"].data_ptr()


def test_gaussian_noise_follows_the_official_protocol(tmp_path):
    clean = random_image(9, 11)
    write_image(tmp_path / "a.png", clean)
    write_image(tmp_path / "b.png", random_image(9, 11, seed=1))
    dataset = GaussianNoiseDataset(tmp_path, sigma=25)
    official = clean.copy()
    np.random.seed(0)
    official += np.random.normal(0, 25 / 255.0, official.shape)
    sample = dataset[0]
    np.testing.assert_array_equal(sample["input"].permute(1, 2, 0).numpy(), official)
    assert sample["input"].min() < 0 or sample["input"].max() > 1  # no clipping
    assert torch.equal(dataset[0]["input"], sample["input"])


def test_gaussian_noise_helpers():
    img = random_image(5, 6)
    noisy = add_gaussian_noise(img, 15, np.random.RandomState(3))
    np.testing.assert_array_equal(noisy, add_gaussian_noise(img, 15, 3))
    assert noisy.dtype == np.float32 and not np.array_equal(noisy, img)
    assert validation_sigma(None, [0, 50]) == 25 and validation_sigma(15, [0, 50]) == 15
    with pytest.raises(ValueError, match="sigma"):
        validation_sigma(None, None)


def test_torch_gaussian_noise_like():
    x = torch.zeros(4, 3, 64, 64)
    noise = gaussian_noise_like(x, 25.0, generator=torch.Generator().manual_seed(0))
    assert noise.shape == x.shape and abs(noise.std().item() - 25 / 255) < 0.005
    again = gaussian_noise_like(x, 25.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise, again)
    per_sample = gaussian_noise_like(x, torch.tensor([0.0, 10.0, 20.0, 40.0]))
    stds = per_sample.flatten(1).std(dim=1)
    assert stds[0] == 0 and torch.allclose(stds[1:], torch.tensor([10.0, 20.0, 40.0]) / 255, rtol=0.05)
    with pytest.raises(ValueError, match="shape"):
        gaussian_noise_like(x, torch.tensor([1.0, 2.0]))


def write_sidd_mats(root: Path, shape=(2, 3, 8, 8, 3)) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, shape, dtype=np.uint8)
    gt = rng.integers(0, 256, shape, dtype=np.uint8)
    scipy.io.savemat(root / "ValidationNoisyBlocksSrgb.mat", {"ValidationNoisyBlocksSrgb": noisy})
    scipy.io.savemat(root / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": gt})
    return root / "ValidationNoisyBlocksSrgb.mat", root / "ValidationGtBlocksSrgb.mat", noisy, gt


def test_sidd_blocks_from_mat_files(tmp_path):
    noisy_path, gt_path, noisy, gt = write_sidd_mats(tmp_path)
    dataset = SIDDBlocksDataset(noisy_path, gt_path)
    assert len(dataset) == 6
    sample = dataset[4]
    assert sample["name"] == "01_01"
    np.testing.assert_array_equal(sample["input"].permute(1, 2, 0).numpy(), noisy[1, 1] / np.float32(255))
    np.testing.assert_array_equal(sample["target"].permute(1, 2, 0).numpy(), gt[1, 1] / np.float32(255))
    assert mean_input_psnr(dataset) < 15


def test_sidd_mat_errors(tmp_path):
    _, gt_path, _, _ = write_sidd_mats(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="missing.mat"):
        SIDDBlocksDataset(tmp_path / "missing.mat", gt_path)
    with pytest.raises(DatasetError, match="no variable 'ValidationNoisyBlocksSrgb'.*ValidationGtBlocksSrgb"):
        SIDDBlocksDataset(gt_path, gt_path)
    scipy.io.savemat(tmp_path / "flat.mat", {"ValidationNoisyBlocksSrgb": np.zeros((6, 8, 8, 3), np.uint8)})
    with pytest.raises(DatasetError, match=r"shape \(6, 8, 8, 3\).*40 x 32 x 256 x 256 x 3"):
        SIDDBlocksDataset(tmp_path / "flat.mat", gt_path)
    (tmp_path / "junk.mat").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="junk.mat"):
        SIDDBlocksDataset(tmp_path / "junk.mat", gt_path)


def test_natural_key():
    assert sorted(["a10", "a2", "A1"], key=natural_key) == ["A1", "a2", "a10"]
