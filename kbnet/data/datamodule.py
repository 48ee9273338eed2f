"""LightningDataModules: one generic module for every on-disk benchmark, configured by named dataset specs.

A spec is a small mapping ``{kind: paired|clean|gaussian|sidd_mat, ...arguments of that dataset class}``.
Specs are checked when the module is built (so a typo in a config fails at once) but nothing touches the
disk until ``setup``, so a config can be instantiated on a machine without the data.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from kbnet.data.datasets import (
    SIDD_GT_KEY,
    SIDD_NOISY_KEY,
    CleanImageDataset,
    DatasetNotFoundError,
    GaussianNoiseDataset,
    PairedImageDataset,
    RestorationDataset,
    SIDDBlocksDataset,
    mean_input_psnr,
)
from kbnet.data.resumable import ResumableLoader, resumable_train_loader
from kbnet.data.verify import VERIFY_MODES, verify_datasets
from kbnet.errors import ConfigError

DATASET_KINDS: dict[str, type[RestorationDataset]] = {
    "paired": PairedImageDataset,
    "clean": CleanImageDataset,
    "gaussian": GaussianNoiseDataset,
    "sidd_mat": SIDDBlocksDataset,
}
_SPEC_ONLY_KEYS = ("kind", "only_for_channels")


def _spec_parameters(kind: str) -> dict[str, inspect.Parameter]:
    params = inspect.signature(DATASET_KINDS[kind].__init__).parameters
    return {name: p for name, p in params.items() if name != "self" and p.kind is not p.VAR_KEYWORD}


def check_spec(spec: Any, where: str) -> dict[str, Any]:
    """A dataset spec as a plain dict, or an error naming the config key and what was expected."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"{where}: expected a mapping with a 'kind' key, got {type(spec).__name__}")
    spec = dict(spec)
    kind = spec.get("kind")
    if kind not in DATASET_KINDS:
        raise ConfigError(f"{where}.kind: expected one of {', '.join(DATASET_KINDS)}, got {kind!r}")
    params = _spec_parameters(kind)
    unknown = sorted(set(spec) - set(params) - set(_SPEC_ONLY_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} for kind {kind!r} "
                          f"(expected: {', '.join(params)})")
    missing = sorted(n for n, p in params.items() if p.default is p.empty and n not in spec)
    if missing:
        raise ConfigError(f"{where}: kind {kind!r} needs {', '.join(missing)}")
    only = spec.get("only_for_channels")
    if only is not None and only not in (1, 3):
        raise ConfigError(f"{where}.only_for_channels: expected 1 or 3, got {only!r}")
    return spec


def select_specs(sets: Mapping[str, Any], where: str, channels: int) -> dict[str, dict[str, Any]]:
    """Checked specs by name, in order, without those reserved for the other channel count."""
    specs = {str(name): check_spec(spec, f"{where}.{name}") for name, spec in sets.items()}
    return {name: spec for name, spec in specs.items() if spec.get("only_for_channels") in (None, channels)}


def describe_layout(spec: Mapping[str, Any]) -> str:
    """The files a spec expects, one per line, for error messages."""
    kind = spec["kind"]
    if kind == "paired":
        lines = [f"{spec['input_dir']}/<name>.png   degraded inputs",
                 f"{spec['target_dir']}/<name>.png   clean targets, same file names"]
        if spec.get("labels") is not None:
            lines.append(f"{spec['labels']}   1-based indices of the pairs in this set")
        return "\n".join(lines)
    if kind == "clean":
        return f"{spec['folder']}/<name>.png   clean images"
    if kind == "gaussian":
        return f"{spec['folder']}/<name>.png   clean images (the noise is added with a fixed seed)"
    return (f"{spec['noisy']}   MATLAB file with variable {spec.get('noisy_key', SIDD_NOISY_KEY)}\n"
            f"{spec['gt']}   MATLAB file with variable {spec.get('gt_key', SIDD_GT_KEY)}")


class LoaderDataModule(LightningDataModule):
    """Dataloader plumbing shared by the data modules: training patches in batches, whole images one by one.

    ``batch_size`` is the per-device training batch (``None`` in the data configs: ``train`` derives it from
    ``global_batch_size``; validation and test load one image at a time). ``val_set_names``/``test_set_names`` are
    known from the configuration, before any data is read, so a LightningModule can name its metrics early.
    Subclasses fill ``train_dataset``, ``val_datasets`` and
    ``test_datasets`` (name -> dataset) in ``setup``. Worker seeding is left to Lightning: with
    ``seed_everything(seed, workers=True)`` every worker of every rank gets its own reproducible seed, which seeds
    the augmentations' stream. The training loader is a ``StatefulDataLoader`` (``kbnet.data.resumable``), so a
    resumed run continues the same data order and augmentations.
    """

    def __init__(self, batch_size: int | None, num_workers: int, pin_memory: bool, val_set_names: list[str],
                 test_set_names: list[str]) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be 0 or more, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.val_set_names = val_set_names
        self.test_set_names = test_set_names
        self.train_dataset: Dataset | None = None
        self.val_datasets: dict[str, Dataset] = {}
        self.test_datasets: dict[str, Dataset] = {}

    def _loader(self, dataset: Dataset) -> DataLoader:
        """Whole images one at a time, in order (validation and test)."""
        return DataLoader(dataset, batch_size=1, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> ResumableLoader:
        if self.train_dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup('fit') must run before train_dataloader()")
        if self.batch_size is None:
            raise ConfigError(f"{type(self).__name__} has no training batch size: train.py sets it from "
                              "global_batch_size; pass batch_size=<per-device batch> when building it yourself")
        if len(self.train_dataset) < self.batch_size:
            raise ConfigError(f"the training set has {len(self.train_dataset)} samples per epoch, fewer than "
                              f"batch_size={self.batch_size}; raise train_repeat in the data config")
        return resumable_train_loader(self.train_dataset, self.batch_size, self.num_workers, self.pin_memory)

    def _loaders(self, datasets: dict[str, Dataset], names: list[str], stage: str) -> list[DataLoader]:
        if set(datasets) != set(names):
            raise RuntimeError(f"{type(self).__name__}.setup('{stage}') must run before its dataloaders")
        return [self._loader(datasets[name]) for name in names]

    def val_dataloader(self) -> list[DataLoader]:
        return self._loaders(self.val_datasets, self.val_set_names, "validate")

    def test_dataloader(self) -> list[DataLoader]:
        return self._loaders(self.test_datasets, self.test_set_names, "test")

    def val_input_psnr(self) -> dict[str, float]:
        """Mean PSNR of the degraded validation inputs per set: the score of doing nothing.

        Reads every validation image once.
        """
        return {name: mean_input_psnr(loader.dataset) for name, loader in
                zip(self.val_set_names, self.val_dataloader(), strict=True)}


class RestorationDataModule(LoaderDataModule):
    """Training patches from one dataset spec, plus named validation and test sets (whole images).

    Args:
        train: spec of the training set (cropped to ``patch_size``; dihedral augmentation if
            ``geometric_augs``).
        val_sets / test_sets: name -> spec; a spec with ``only_for_channels: 1|3`` belongs to gray or colour
            benchmarks only (e.g. Set12 vs CBSD68) and is left out for the other channel count.
        channels: 1 (gray) or 3 (RGB); images are converted on reading.
        patch_size: side of the square training crops (the official loader crops the largest progressive
            patch; the LightningModule sub-crops smaller ones).
        batch_size: training batch size per device; validation and test use 1.
        train_repeat: times each training image is listed per epoch.
        prepare_hint: how to obtain the data, shown when it is missing.
        verify: ``header`` | ``full`` | ``off``: how the files are checked in ``setup``, before any training
            step (``kbnet.data.verify``).
    """

    def __init__(self, train: Mapping[str, Any], val_sets: Mapping[str, Mapping[str, Any]],
                 test_sets: Mapping[str, Mapping[str, Any]] | None = None, channels: int = 3,
                 patch_size: int = 384, batch_size: int | None = 8, geometric_augs: bool = True,
                 train_repeat: int = 1, num_workers: int = 8, pin_memory: bool = True,
                 prepare_hint: str = "", verify: str = "header") -> None:
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels}")
        if verify not in VERIFY_MODES:
            raise ConfigError(f"data.verify={verify!r}: expected one of {', '.join(VERIFY_MODES)}")
        self.verify = verify
        self.train_spec = check_spec(train, "train")
        self.val_specs = select_specs(val_sets, "val_sets", channels)
        self.test_specs = select_specs(test_sets or {}, "test_sets", channels)
        super().__init__(batch_size, num_workers, pin_memory, list(self.val_specs), list(self.test_specs))
        self.channels = channels
        self.patch_size = patch_size
        self.geometric_augs = geometric_augs
        self.train_repeat = train_repeat
        self.prepare_hint = prepare_hint

    def build(self, spec: Mapping[str, Any], name: str, train: bool = False) -> RestorationDataset:
        """One dataset from its spec; a missing file becomes an error with the layout and how to get it."""
        args = {k: v for k, v in spec.items() if k not in ("kind", "only_for_channels")}
        if train:
            args.update(patch_size=self.patch_size, geometric_augs=self.geometric_augs,
                        repeat=self.train_repeat)
        try:
            return DATASET_KINDS[spec["kind"]](channels=self.channels, **args)
        except DatasetNotFoundError as err:
            layout = "\n".join("  " + line for line in describe_layout(spec).splitlines())
            hint = f"Prepare it: {self.prepare_hint} (see data/README.md)\n" if self.prepare_hint else ""
            raise DatasetNotFoundError(
                err.path,
                f"dataset '{name}': {err.reason}",
                f"Expected layout:\n{layout}\n{hint}"
                "No dataset at hand? Try the built-in demo data: data=demo",
            ) from err

    def setup(self, stage: str | None = None) -> None:
        built: dict[str, Dataset] = {}
        if stage in ("fit", None) and self.train_dataset is None:
            self.train_dataset = built["train"] = self.build(self.train_spec, "train", train=True)
        if stage in ("fit", "validate", None) and len(self.val_datasets) != len(self.val_specs):
            self.val_datasets = {name: self.build(spec, name) for name, spec in self.val_specs.items()}
            built.update({f"validation set {name}": ds for name, ds in self.val_datasets.items()})
        if stage in ("test", None) and len(self.test_datasets) != len(self.test_specs):
            self.test_datasets = {name: self.build(spec, name) for name, spec in self.test_specs.items()}
            built.update({f"test set {name}": ds for name, ds in self.test_datasets.items()})
        if built:
            verify_datasets(built, self.verify)

    def test_dataloader(self) -> list[DataLoader]:
        if not self.test_specs:
            raise ConfigError(f"this data config defines no test sets for channels={self.channels}")
        return super().test_dataloader()
