"""Datasets that yield ``{"input", "target", "name"}`` samples: paired folders, clean folders, seeded Gaussian
noise, the SIDD validation blocks and in-memory arrays.

Training sets (``patch_size`` given) return aligned random patches with dihedral augmentation; validation and
test sets return whole images. Images are float32 C x H x W tensors in [0, 1]. Every problem is an error that
names the file or folder: a pair without its partner, two files of different sizes, an unreadable image.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import torch
from torch.utils.data import Dataset

from kbnet.data.degradations import add_gaussian_noise, validation_sigma
from kbnet.data.resumable import AugmentationStream
from kbnet.data.transforms import PairedTransform
from kbnet.errors import ConfigError, DataError, UserError
from kbnet.imageio import IMAGE_SUFFIXES, convert_channels, read_image

SIDD_NOISY_KEY = "ValidationNoisyBlocksSrgb"
SIDD_GT_KEY = "ValidationGtBlocksSrgb"
_LIST_LIMIT = 20


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset folder or file that is missing or empty; the data module adds the expected layout."""

    def __init__(self, path: Path, reason: str, details: str = "") -> None:
        super().__init__(f"{reason}: {path}" + (f"\n{details}" if details else ""))
        self.path = path
        self.reason = reason


class DatasetError(DataError):
    """Dataset content that cannot be used as is (unpaired files, size mismatch, bad .mat or label file)."""


def natural_key(text: str) -> list[int | str]:
    """Sort key that orders ``img2`` before ``img10``, as ``natsort`` does in the official scripts."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _short_list(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... ({len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


def images_by_stem(folder: str | Path) -> dict[str, Path]:
    """Image files of a folder keyed by file stem, in natural order; a missing or empty folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetNotFoundError(folder, "dataset folder not found")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetNotFoundError(folder, f"dataset folder has no images ({', '.join(IMAGE_SUFFIXES)})")
    by_stem: dict[str, Path] = {}
    for path in sorted(files, key=lambda p: natural_key(p.name)):
        if path.stem in by_stem:
            raise DatasetError(f"{folder}: two images share the name {path.stem!r}: "
                               f"{by_stem[path.stem].name} and {path.name}")
        by_stem[path.stem] = path
    return dict(sorted(by_stem.items(), key=lambda item: natural_key(item[0])))


def read_pixels(path: Path, channels: int) -> np.ndarray:
    """H x W x C float32 pixels of an image file, converted to ``channels`` (errors name the file)."""
    return read_image(path, channels=channels).pixels


def to_chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))


class RestorationDataset(Dataset, ABC):
    """Base class: subclasses load one full (input, target, name) triple; this class crops and augments.

    ``repeat`` lists every image that many times per epoch (BasicSR's ``dataset_enlarge_ratio``), so that
    small training sets still fill an epoch of batches. The augmentations draw from the dataset's own
    ``AugmentationStream``, whose state (``state_dict``) a resumable loader saves, so a resumed run crops and
    flips exactly as the run that never stopped.
    """

    def __init__(self, channels: int = 3, patch_size: int | None = None, geometric_augs: bool = True,
                 repeat: int = 1) -> None:
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels}")
        if repeat < 1:
            raise ConfigError(f"repeat must be at least 1, got {repeat}")
        self.channels = channels
        self.repeat = repeat
        self.transform = PairedTransform(patch_size, geometric_augs) if patch_size is not None else None
        self.augmentation_stream = AugmentationStream()

    @property
    @abstractmethod
    def num_images(self) -> int:
        """Number of distinct images (``len`` counts each ``repeat`` times)."""

    @abstractmethod
    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Full-size (input, target, name) of image ``index``, both H x W x C float32."""

    def __len__(self) -> int:
        return self.num_images * self.repeat

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        inp, target, name = self.load(index % self.num_images)
        if self.transform is not None:
            inp, target = self.transform(inp, target, self.augmentation_stream.generator())
        return {"input": to_chw(inp), "target": to_chw(target), "name": name}

    def state_dict(self) -> dict[str, Any]:
        return {"augmentations": self.augmentation_stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.augmentation_stream.load_state_dict(state["augmentations"])


class PairedImageDataset(RestorationDataset):
    """Degraded/clean image pairs in two folders, matched by file stem (extensions may differ).

    ``labels`` optionally names a ``.npy`` file of 1-based indices into the naturally sorted pairs, the way
    DPDD's ``indoor_labels.npy``/``outdoor_labels.npy`` select their scenes.
    """

    def __init__(self, input_dir: str | Path, target_dir: str | Path, labels: str | Path | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        inputs, targets = images_by_stem(input_dir), images_by_stem(target_dir)
        only_in, only_tg = sorted(inputs.keys() - targets.keys()), sorted(targets.keys() - inputs.keys())
        if only_in or only_tg:
            lines = [f"unpaired images between {input_dir} and {target_dir} (pairs must share a file name):"]
            if only_in:
                lines.append(f"  {len(only_in)} input(s) without a target: {_short_list(only_in)}")
            if only_tg:
                lines.append(f"  {len(only_tg)} target(s) without an input: {_short_list(only_tg)}")
            raise DatasetError("\n".join(lines))
        self.pairs = [(inputs[stem], targets[stem]) for stem in inputs]
        if labels is not None:
            self.pairs = [self.pairs[i] for i in _read_labels(Path(labels), len(self.pairs))]

    @property
    def num_images(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        input_path, target_path = self.pairs[index]
        inp, target = read_pixels(input_path, self.channels), read_pixels(target_path, self.channels)
        if inp.shape[:2] != target.shape[:2]:
            raise DatasetError(
                f"size mismatch: {input_path} is {inp.shape[1]}x{inp.shape[0]} but "
                f"{target_path} is {target.shape[1]}x{target.shape[0]} (width x height)"
            )
        return inp, target, input_path.stem


def _read_labels(path: Path, count: int) -> list[int]:
    if not path.is_file():
        raise DatasetNotFoundError(path, "label file not found")
    try:
        labels = np.load(path).ravel()
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read labels ({err})") from err
    integral = np.issubdtype(labels.dtype, np.number) and np.all(labels == np.round(labels))
    if labels.size == 0 or not integral:
        raise DatasetError(f"{path}: expected a non-empty array of integer image indices, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 1 or labels.max() > count or len(set(labels.tolist())) != labels.size:
        raise DatasetError(f"{path}: expected distinct 1-based indices in 1..{count} (the number of pairs), "
                           f"got values {labels.min()}..{labels.max()}")
    return [int(i) - 1 for i in labels]


class CleanImageDataset(RestorationDataset):
    """Clean images whose input is the image itself: Gaussian-denoising training adds noise on the device."""

    def __init__(self, folder: str | Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.files = list(images_by_stem(folder).values())

    @property
    def num_images(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        img = read_pixels(self.files[index], self.channels)
        return img.copy(), img, self.files[index].stem


class GaussianNoiseDataset(RestorationDataset):
    """Clean images with the official deterministic test noise: every image seeded with ``seed``
    (``np.random.seed(0)`` per image in the official test script).

    σ is ``sigma``, or for blind models the centre of ``sigma_range`` (0-255 units).
    """

    def __init__(self, folder: str | Path, sigma: float | None = None,
                 sigma_range: Sequence[float] | None = None, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.files = list(images_by_stem(folder).values())
        self.sigma = validation_sigma(sigma, None if sigma_range is None else list(sigma_range))
        self.seed = seed

    @property
    def num_images(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        clean = read_pixels(self.files[index], self.channels)
        return add_gaussian_noise(clean, self.sigma, self.seed), clean, self.files[index].stem


def load_sidd_blocks(path: str | Path, key: str) -> np.ndarray:
    """The uint8 blocks array (images x blocks x H x W x 3) stored under ``key`` in a SIDD ``.mat`` file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(path, "SIDD .mat file not found")
    try:
        content = scipy.io.loadmat(str(path))
    except (OSError, ValueError, NotImplementedError, scipy.io.matlab.MatReadError) as err:
        raise DatasetError(f"{path}: cannot read as a MATLAB .mat file ({err})") from err
    if key not in content:
        found = sorted(k for k in content if not k.startswith("__"))
        raise DatasetError(f"{path}: no variable {key!r} (found: {', '.join(found) or 'none'})")
    blocks = content[key]
    if blocks.ndim != 5 or blocks.shape[-1] != 3 or blocks.dtype != np.uint8:
        raise DatasetError(f"{path}: {key} has shape {blocks.shape} and type {blocks.dtype}; expected "
                           "uint8 images x blocks x height x width x 3 (40 x 32 x 256 x 256 x 3 in the "
                           "official file)")
    return blocks


class SIDDBlocksDataset(RestorationDataset):
    """The SIDD sRGB validation blocks (40 images x 32 blocks of 256 x 256) from the official ``.mat`` files.

    Blocks are named ``<image>_<block>`` (zero-based) and scaled by 1/255 with no further processing,
    as in the official SIDD test script.
    """

    def __init__(self, noisy: str | Path, gt: str | Path, noisy_key: str = SIDD_NOISY_KEY,
                 gt_key: str = SIDD_GT_KEY, **kwargs) -> None:
        super().__init__(**kwargs)
        self.noisy = load_sidd_blocks(noisy, noisy_key)
        self.gt = load_sidd_blocks(gt, gt_key)
        if self.noisy.shape != self.gt.shape:
            raise DatasetError(f"SIDD blocks differ in shape: {noisy} has {self.noisy.shape}, "
                               f"{gt} has {self.gt.shape}")

    @property
    def num_images(self) -> int:
        return self.noisy.shape[0] * self.noisy.shape[1]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        image, block = divmod(index, self.noisy.shape[1])

        def pixels(blocks: np.ndarray) -> np.ndarray:
            img = blocks[image, block].astype(np.float32) / 255.0
            return convert_channels(img, self.channels, f"SIDD block {image}/{block}")

        return pixels(self.noisy), pixels(self.gt), f"{image:02d}_{block:02d}"


class ArrayPairsDataset(RestorationDataset):
    """(input, target) pairs already in memory, e.g. the synthesized demo photos."""

    def __init__(self, inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], names: Sequence[str],
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if not len(inputs) == len(targets) == len(names):
            raise ValueError(f"got {len(inputs)} inputs, {len(targets)} targets and {len(names)} names")
        for inp, target, name in zip(inputs, targets, names, strict=True):
            if inp.shape != target.shape or inp.ndim != 3 or inp.shape[2] != self.channels:
                raise ValueError(f"{name}: input {inp.shape} and target {target.shape} must both be "
                                 f"H x W x {self.channels}")
        self.inputs, self.targets, self.names = list(inputs), list(targets), list(names)

    @property
    def num_images(self) -> int:
        return len(self.names)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        return self.inputs[index], self.targets[index], self.names[index]


def mean_input_psnr(dataset: RestorationDataset) -> float:
    """Mean per-image PSNR (dB, peak 1) of the clamped degraded input against the target: the baseline a
    restoration model has to beat."""
    values = []
    for index in range(dataset.num_images):
        inp, target, _ = dataset.load(index)
        mse = float(np.mean((np.clip(inp, 0.0, 1.0).astype(np.float64) - target) ** 2))
        values.append(float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse))
    return float(np.mean(values))
