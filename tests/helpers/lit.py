"""A tiny backbone, its recipe, generated image pairs and a short real ``Trainer`` fit, for the LightningModule
tests."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader

from kbnet.lit import (
    RestorationModule,
)

NET_CONFIG = {"_target_": "kbnet.models.create_model", "name": "kbnet_s_tiny", "width": 8}


RECIPE = {
    "optimizer": {"_target_": "torch.optim.AdamW", "lr": 3e-4, "weight_decay": 1e-4, "betas": [0.9, 0.999]},
    "lr_schedule": {"periods": [92000, 208000], "eta_mins": [3e-4, 1e-6]},
}


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return instantiate(NET_CONFIG)


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Random low-frequency colour images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)


class PairsData(L.LightningDataModule):
    """Generated pairs: clean training pairs (Gaussian) or degraded ones, noisy validation pairs."""

    def __init__(self, clean_train: bool, batch_size: int = 8, size: int = 32, val_size: int = 40) -> None:
        super().__init__()
        clean = smooth_images(16, size, seed=1)
        noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
        inputs = clean if clean_train else noisy
        self.train = [{"input": inputs[i], "target": clean[i], "name": f"img{i}"} for i in range(16)]
        val_clean = smooth_images(2, val_size, seed=3)
        val_noisy = val_clean + 0.1 * torch.randn(val_clean.shape, generator=torch.Generator().manual_seed(4))
        self.val = [{"input": val_noisy[i], "target": val_clean[i], "name": f"val{i}"} for i in range(2)]
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=1)


def fit(module: RestorationModule, data: L.LightningDataModule, tmp_path: Path, max_steps: int = 4,
        **trainer_args) -> L.Trainer:
    args = {"accelerator": "cpu", "max_steps": max_steps, "val_check_interval": 2, "check_val_every_n_epoch": None,
            "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False, "gradient_clip_val": 0.01, "num_sanity_val_steps": 0,
            "default_root_dir": tmp_path, **trainer_args}
    trainer = L.Trainer(**args)
    trainer.fit(module, datamodule=data)
    return trainer
