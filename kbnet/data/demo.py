"""The demo data: real photos that ship inside scikit-image, degraded synthetically for each task.

Nothing is downloaded, so the project trains and validates out of the box. The photos are split by photo
(no photo is in both splits), downscaled so a tiny model trains on a laptop CPU in minutes, and degraded
deterministically, so every run sees the same pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import skimage.data

from kbnet.data.datamodule import LoaderDataModule
from kbnet.data.datasets import ArrayPairsDataset
from kbnet.data.degradations import TASKS, add_gaussian_noise, degrade, validation_sigma
from kbnet.data.verify import VERIFY_MODES
from kbnet.errors import ConfigError
from kbnet.imageio import convert_channels
from kbnet.models.registry import largest_size_multiple

_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skimage.data.astronaut,
    "coffee": skimage.data.coffee,
    "rocket": skimage.data.rocket,
    "immunohistochemistry": skimage.data.immunohistochemistry,
    "hubble_deep_field": skimage.data.hubble_deep_field,
    "camera": skimage.data.camera,
    "brick": skimage.data.brick,
    "chelsea": skimage.data.chelsea,
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
    "coins": skimage.data.coins,
}
DEMO_TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "camera",
                     "brick")
DEMO_VAL_PHOTOS = ("chelsea", "motorcycle", "coins")


def load_photo(name: str, channels: int, max_side: int) -> np.ndarray:
    """A scikit-image photo as float32 H x W x ``channels``, downscaled so its longer side is at most
    ``max_side`` and centre-cropped to multiples of the presets' largest size multiple (16, KBNet_s's four
    downsamplings), so every preset takes it without padding."""
    if name not in _PHOTOS:
        raise ConfigError(f"unknown demo photo {name!r}; available: {', '.join(_PHOTOS)}")
    multiple = largest_size_multiple()
    if max_side < multiple:
        raise ConfigError(f"max_side must be at least {multiple}, got {max_side}")
    img = _PHOTOS[name]().astype(np.float32) / 255.0
    if img.ndim == 2:
        img = img[:, :, None]
    img = convert_channels(img, channels, source=f"skimage.data {name}")
    scale = max_side / max(img.shape[:2])
    if scale < 1:
        width = max(multiple, round(img.shape[1] * scale))
        height = max(multiple, round(img.shape[0] * scale))
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA).reshape(height, width, channels)
    h, w = (img.shape[0] // multiple) * multiple, (img.shape[1] // multiple) * multiple
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return np.ascontiguousarray(np.clip(img[top:top + h, left:left + w], 0.0, 1.0))


class DemoDataModule(LoaderDataModule):
    """Built-in demo data for any task: 7 training photos, 3 validation photos (also the test set).

    Args:
        task: one of gaussian_denoise, real_denoise, derain, defocus_deblur, motion_deblur.
        channels: 1 (gray) or 3 (RGB); photos are converted.
        sigma / sigma_range: Gaussian noise level (0-255) of the task; validation noise uses ``sigma``, or
            the centre of ``sigma_range`` for blind training. Used by gaussian_denoise only.
        patch_size, batch_size: training crops and batch size per device.
        train_size / val_size: longer side of the downscaled training / validation photos.
        train_repeat: times each training photo is listed per epoch.
        seed: seed of the synthetic degradations (Gaussian validation noise: the same seed for every image,
            as the official test protocol does).

    ``verify`` is accepted like every data config's (``kbnet.data.verify``); the demo photos are built in memory
    from scikit-image's arrays, so there is no file to check.

    For gaussian_denoise the training inputs equal the targets: the LightningModule adds fresh noise itself.
    """

    def __init__(self, task: str, channels: int = 3, sigma: float | None = None,
                 sigma_range: Sequence[float] | None = None, patch_size: int = 64, batch_size: int | None = 8,
                 train_size: int = 256, val_size: int = 256, train_repeat: int = 16, seed: int = 0,
                 geometric_augs: bool = True, num_workers: int = 0, pin_memory: bool = False,
                 verify: str = "header") -> None:
        super().__init__(batch_size, num_workers, pin_memory, val_set_names=["demo"], test_set_names=["demo"])
        if task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels}")
        if verify not in VERIFY_MODES:
            raise ConfigError(f"data.verify={verify!r}: expected one of {', '.join(VERIFY_MODES)}")
        self.task = task
        self.channels = channels
        self.val_sigma = (validation_sigma(sigma, None if sigma_range is None else list(sigma_range))
                          if task == "gaussian_denoise" else None)
        self.patch_size = patch_size
        self.train_size = train_size
        self.val_size = val_size
        self.train_repeat = train_repeat
        self.seed = seed
        self.geometric_augs = geometric_augs

    def _pairs(self, names: Sequence[str], max_side: int, train: bool) -> tuple[list, list]:
        targets = [load_photo(name, self.channels, max_side) for name in names]
        if self.task == "gaussian_denoise":
            inputs = ([t.copy() for t in targets] if train
                      else [add_gaussian_noise(t, self.val_sigma, self.seed) for t in targets])
        else:
            inputs = [degrade(self.task, t, name, self.seed) for t, name in zip(targets, names, strict=True)]
        return inputs, targets

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            inputs, targets = self._pairs(DEMO_TRAIN_PHOTOS, self.train_size, train=True)
            self.train_dataset = ArrayPairsDataset(
                inputs, targets, DEMO_TRAIN_PHOTOS, channels=self.channels, patch_size=self.patch_size,
                geometric_augs=self.geometric_augs, repeat=self.train_repeat,
            )
        if not self.val_datasets:
            inputs, targets = self._pairs(DEMO_VAL_PHOTOS, self.val_size, train=False)
            demo = ArrayPairsDataset(inputs, targets, DEMO_VAL_PHOTOS, channels=self.channels)
            self.val_datasets = {"demo": demo}
            self.test_datasets = {"demo": demo}
