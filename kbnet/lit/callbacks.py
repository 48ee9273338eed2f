"""Callbacks of the training runs: last.ckpt that always holds the final step, a step-based progress bar and
validation image grids for any logger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from kbnet.imageio import to_integer, write_image


class ValidationImages(L.Callback):
    """Logs ``input | restored | target`` side by side for the first ``num_images`` images of the first val set.

    wandb and TensorBoard receive the images; with ``save_png`` (or when no such logger is active) they are also
    written as ``<dirpath>/step<step>_<name>.png``, so even an offline run shows its result without any tool.
    """

    def __init__(self, dirpath: str | Path, num_images: int = 2, save_png: bool = True) -> None:
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        self.dirpath = Path(dirpath)
        self.num_images = num_images
        self.save_png = save_png
        self._grids: list[tuple[str, torch.Tensor]] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._grids = []

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        for i in range(batch["target"].shape[0]):
            if len(self._grids) >= self.num_images:
                return
            row = [batch["input"][i].clamp(0, 1), outputs["restored"][i], batch["target"][i].clamp(0, 1)]
            self._grids.append((str(batch["name"][i]), torch.cat(row, dim=-1).float().cpu()))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._grids or trainer.sanity_checking or not trainer.is_global_zero:
            return
        step = trainer.global_step
        image_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger | TensorBoardLogger)]
        for logger in image_loggers:
            if isinstance(logger, WandbLogger):
                # uint8 HxWxC (HxW for gray) so wandb needs no guess about the value range
                images = [to_integer(g.permute(1, 2, 0).squeeze(-1).numpy()) for _, g in self._grids]
                logger.log_image(key="val/images", images=images,
                                 caption=[f"{name}: input | restored | target" for name, _ in self._grids],
                                 step=step)
            else:
                for name, grid in self._grids:
                    logger.experiment.add_image(f"val/images/{name}", grid, global_step=step)
        if self.save_png or not image_loggers:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            for name, grid in self._grids:
                # A resumed run validates its resume step again: same step, same image, so replacing is safe.
                safe_name = name.replace("/", "_").replace("\\", "_")
                write_image(self.dirpath / f"step{step:07d}_{safe_name}.png", grid.permute(1, 2, 0).numpy(),
                            bit_depth=8, overwrite=True)
        self._grids = []


class StepProgressBar(RichProgressBar):
    """Rich progress bar for step-based runs: shows ``step k/max_steps``; the epoch counter (max_epochs = -1,
    epochs of arbitrary length) means nothing here."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {"step": f"{trainer.global_step}/{trainer.max_steps}", **super().get_metrics(trainer, pl_module)}

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'Training':{len(self.validation_description)}}"


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps and at the end of training, whatever ``max_steps`` is.

    Lightning saves ``last`` at the end only if it never saved it before, so a run whose ``max_steps`` is not a
    multiple of the interval would otherwise lose its final steps. Nothing is saved after an exception (e.g. a
    NaN stop): the file keeps the last good state.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int) -> None:
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
