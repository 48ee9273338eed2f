"""Datasets, degradations and LightningDataModules for KBNet training and evaluation."""

from kbnet.data.datamodule import DATASET_KINDS, LoaderDataModule, RestorationDataModule
from kbnet.data.datasets import (
    ArrayPairsDataset,
    CleanImageDataset,
    DatasetError,
    DatasetNotFoundError,
    GaussianNoiseDataset,
    PairedImageDataset,
    RestorationDataset,
    SIDDBlocksDataset,
    mean_input_psnr,
)
from kbnet.data.degradations import TASKS, add_gaussian_noise, gaussian_noise_like
from kbnet.data.demo import DEMO_TRAIN_PHOTOS, DEMO_VAL_PHOTOS, DemoDataModule

__all__ = [
    "DATASET_KINDS",
    "DEMO_TRAIN_PHOTOS",
    "DEMO_VAL_PHOTOS",
    "TASKS",
    "ArrayPairsDataset",
    "CleanImageDataset",
    "DatasetError",
    "DatasetNotFoundError",
    "DemoDataModule",
    "GaussianNoiseDataset",
    "LoaderDataModule",
    "PairedImageDataset",
    "RestorationDataModule",
    "RestorationDataset",
    "SIDDBlocksDataset",
    "add_gaussian_noise",
    "gaussian_noise_like",
    "mean_input_psnr",
]
