"""Paired crop + dihedral augmentation: alignment, reflect padding, the 8 transforms, seeding."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kbnet.data.datasets import ArrayPairsDataset
from kbnet.data.transforms import PairedTransform


def dihedral_group(img: np.ndarray) -> list[np.ndarray]:
    rotations = [np.rot90(img, k) for k in range(4)]
    return rotations + [np.flipud(r) for r in rotations]


def coded_image(h: int, w: int) -> np.ndarray:
    """Every pixel value names its position, so a patch tells where it came from."""
    return (np.arange(h * w, dtype=np.float32).reshape(h, w, 1) + 1) / (h * w + 1)


def test_crop_and_augmentation_keep_pairs_aligned():
    rng = np.random.default_rng(0)
    inp = rng.random((40, 50, 3), dtype=np.float32)
    transform = PairedTransform(patch_size=16)
    torch.manual_seed(0)
    for _ in range(20):
        a, b = transform(inp, 1.0 - inp)
        assert a.shape == b.shape == (16, 16, 3)
        np.testing.assert_allclose(b, 1.0 - a, atol=1e-6)


def test_patch_is_a_dihedral_image_of_a_window():
    img = coded_image(30, 24)
    transform = PairedTransform(patch_size=8)
    torch.manual_seed(1)
    for _ in range(20):
        patch, _ = transform(img, img)
        found = False
        for candidate in dihedral_group(patch):
            top_left = int(np.rint(candidate[0, 0, 0] * (30 * 24 + 1))) - 1
            r, c = divmod(top_left, 24)
            if r + 8 <= 30 and c + 8 <= 24 and np.array_equal(candidate, img[r:r + 8, c:c + 8]):
                found = True
        assert found


def test_small_images_are_reflect_padded_bottom_right_like_cv2_border_reflect():
    img = coded_image(5, 7)
    patch, _ = PairedTransform(patch_size=16, geometric_augs=False)(img, img)
    expected = cv2.copyMakeBorder(img, 0, 11, 0, 9, cv2.BORDER_REFLECT)[:, :, None]
    np.testing.assert_array_equal(patch, expected)
    reflect_101 = cv2.copyMakeBorder(img, 0, 11, 0, 9, cv2.BORDER_REFLECT_101)[:, :, None]
    assert not np.array_equal(patch, reflect_101)
    np.testing.assert_array_equal(patch[:5, :7], img)
    np.testing.assert_array_equal(patch[5, :7], img[4])  # the edge row is repeated: REFLECT, not REFLECT_101


def test_the_eight_dihedral_transforms_all_occur_and_nothing_else():
    img = coded_image(4, 4)
    transform = PairedTransform(patch_size=4)
    expected = {candidate.tobytes() for candidate in dihedral_group(img)}
    assert len(expected) == 8
    torch.manual_seed(0)
    seen = {transform(img, img)[0].tobytes() for _ in range(200)}
    assert seen == expected


def test_augmentation_follows_the_torch_seed():
    img = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    transform = PairedTransform(patch_size=8)

    def draws(seed: int) -> list[np.ndarray]:
        torch.manual_seed(seed)
        return [transform(img, img)[0] for _ in range(5)]

    assert all(np.array_equal(a, b) for a, b in zip(draws(3), draws(3), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(draws(3), draws(4), strict=True))


def test_dataloader_workers_draw_different_crops():
    img = np.random.default_rng(0).random((64, 64, 1), dtype=np.float32)
    dataset = ArrayPairsDataset([img], [img], ["x"], channels=1, patch_size=8, repeat=8)
    torch.manual_seed(0)
    loader = DataLoader(dataset, batch_size=4, num_workers=2)
    first, second = (batch["input"] for batch in loader)
    assert not torch.equal(first, second)


def test_invalid_patch_size():
    with pytest.raises(ValueError, match="patch_size"):
        PairedTransform(patch_size=0)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        PairedTransform(patch_size=4)(np.zeros((8, 8, 3), np.float32), np.zeros((8, 9, 3), np.float32))
