"""The built-in demo data: a disjoint, explicit photo split; deterministic degradations that really degrade."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from skimage.restoration import denoise_nl_means

from kbnet.data import DEMO_TRAIN_PHOTOS, DEMO_VAL_PHOTOS, TASKS, DemoDataModule
from kbnet.data.degradations import add_gaussian_noise, degrade, disk_kernel
from kbnet.data.demo import load_photo
from kbnet.lit.callbacks import DenoisingBaseline


def test_split_is_explicit_and_disjoint():
    assert DEMO_TRAIN_PHOTOS == ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
                                 "camera", "brick")
    assert DEMO_VAL_PHOTOS == ("chelsea", "motorcycle", "coins")
    assert not set(DEMO_TRAIN_PHOTOS) & set(DEMO_VAL_PHOTOS)


def test_no_validation_photo_is_a_training_photo_in_disguise():
    train = [load_photo(n, 1, 32) for n in DEMO_TRAIN_PHOTOS]
    for name in DEMO_VAL_PHOTOS:
        val = load_photo(name, 1, 32)
        for other in train:
            if other.shape == val.shape:
                assert np.abs(other - val).mean() > 0.05


def test_photos_are_downscaled_to_multiples_of_16():
    for name in (*DEMO_TRAIN_PHOTOS, *DEMO_VAL_PHOTOS):
        img = load_photo(name, 3, 160)
        assert max(img.shape[:2]) <= 160 and img.shape[0] % 16 == 0 and img.shape[1] % 16 == 0
        assert img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1


@pytest.fixture(scope="module")
def modules() -> dict[str, DemoDataModule]:
    out = {}
    for task in TASKS:
        dm = DemoDataModule(task, channels=3, sigma=25)
        dm.setup("fit")
        out[task] = dm
    return out


@pytest.mark.parametrize("task", TASKS)
def test_each_task_degrades_validation_inputs(modules, task):
    dm = modules[task]
    dataset = dm.val_datasets["demo"]
    assert dataset.names == list(DEMO_VAL_PHOTOS)
    psnr = dm.val_input_psnr()["demo"]
    assert 15 < psnr < 32, psnr
    for inp, target in zip(dataset.inputs, dataset.targets, strict=True):
        assert inp.shape == target.shape and not np.allclose(inp, target)


@pytest.mark.parametrize("task", TASKS)
def test_degradations_are_deterministic(modules, task):
    again = DemoDataModule(task, channels=3, sigma=25)
    again.setup("fit")
    for a, b in ((modules[task].val_datasets["demo"], again.val_datasets["demo"]),
                 (modules[task].train_dataset, again.train_dataset)):
        for x, y in zip(a.inputs, b.inputs, strict=True):
            np.testing.assert_array_equal(x, y)


def test_degradation_depends_on_the_seed():
    img = load_photo("chelsea", 3, 64)
    for task in ("real_denoise", "derain", "motion_deblur"):
        assert not np.array_equal(degrade(task, img, "chelsea", seed=0), degrade(task, img, "chelsea", seed=1))


def test_gaussian_training_is_clean_and_validation_uses_the_official_noise(modules):
    dm = modules["gaussian_denoise"]
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["input"], batch["target"])
    val = dm.val_datasets["demo"]
    for inp, target in zip(val.inputs, val.targets, strict=True):
        np.testing.assert_array_equal(inp, add_gaussian_noise(target, 25, 0))


def test_blind_gaussian_validates_at_the_centre_of_the_range():
    assert DemoDataModule("gaussian_denoise", sigma_range=[0, 50]).val_sigma == 25
    with pytest.raises(ValueError, match="sigma"):
        DemoDataModule("gaussian_denoise")


@pytest.mark.parametrize("task", ["gaussian_denoise", "derain"])
def test_gray_demo(task):
    dm = DemoDataModule(task, channels=1, sigma=15, batch_size=2, patch_size=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (2, 1, 32, 32)
    val = next(iter(dm.val_dataloader()[0]))
    assert val["input"].shape[:2] == (1, 1) and val["name"] == ["chelsea"]


def test_loaders_and_set_names(modules):
    dm = modules["derain"]
    assert dm.val_set_names == ["demo"] and dm.test_set_names == ["demo"]
    assert len(dm.train_dataloader()) == len(DEMO_TRAIN_PHOTOS) * 16 // 8
    assert [len(loader) for loader in dm.val_dataloader()] == [len(DEMO_VAL_PHOTOS)]
    assert [len(loader) for loader in dm.test_dataloader()] == [len(DEMO_VAL_PHOTOS)]


def test_unknown_task():
    with pytest.raises(ValueError, match="task must be one of"):
        DemoDataModule("deblur")


def test_disk_kernel():
    assert disk_kernel(2.5).shape == (5, 5)
    kernel = disk_kernel(3.0)
    assert kernel.shape == (7, 7) and abs(kernel.sum().item() - 1) < 1e-6
    assert torch.allclose(kernel, kernel.flip(0)) and torch.allclose(kernel, kernel.T)
    assert kernel[3, 3] > kernel[3, 0] > 0 and kernel[0, 0] == 0


def test_denoising_baseline_scores_non_local_means_on_the_validation_images() -> None:
    """The demo's closing comparison: NLM with the documented settings, colour and gray, per-image mean PSNR."""
    rng = np.random.default_rng(0)
    for channels in (3, 1):
        items = []
        for _ in range(2):
            target = np.clip(rng.random((32, 48, channels)) * 0.2 + 0.4, 0, 1)
            noisy = target + rng.normal(0, 25 / 255, target.shape)
            items.append({"input": torch.from_numpy(noisy.transpose(2, 0, 1)),
                          "target": torch.from_numpy(target.transpose(2, 0, 1))})
        trainer = SimpleNamespace(val_dataloaders=[SimpleNamespace(dataset=items)])
        nlm, count = DenoisingBaseline(sigma=25, task="gaussian_denoise").nlm_psnr(trainer)
        s = 25 / 255
        expected = np.mean([10 * np.log10(1 / np.mean((denoise_nl_means(
            item["input"].numpy().transpose(1, 2, 0), h=0.8 * s, sigma=s, patch_size=5, patch_distance=6,
            fast_mode=True, channel_axis=-1).reshape(32, 48, channels).clip(0, 1)
            - item["target"].numpy().transpose(1, 2, 0)) ** 2)) for item in items])
        assert count == 2 and nlm == pytest.approx(expected, abs=1e-9)
