"""Callbacks of the training runs: last.ckpt that always holds the final step, a step-based progress bar and
validation image grids for any logger."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from kbnet.errors import ConfigError
from kbnet.imageio import to_integer, write_image

log = logging.getLogger(__name__)


class ValidationImages(L.Callback):
    """Logs ``input | restored | target`` side by side for the first ``num_images`` images of the first val set.

    wandb and TensorBoard receive the images; with ``save_png`` (or when no such logger is active) they are also
    written as ``<dirpath>/step<step>_<name>.png``, so even an offline run shows its result without any tool.
    """

    def __init__(self, dirpath: str | Path, num_images: int = 2, save_png: bool = True) -> None:
        if num_images < 0:
            raise ConfigError(f"num_images must be >= 0, got {num_images}")
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

    On a step that a validation follows, the save waits for the end of that validation: Lightning, resuming from a
    checkpoint saved between the step and its validation, counts that validation as done without running it, so
    its metrics and best checkpoint would be missing from the resumed run.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int) -> None:
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)
        self._after_validation = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        epoch_loop = trainer.fit_loop.epoch_loop
        if epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._after_validation = not self._should_skip_saving_checkpoint(trainer) and (
                trainer.global_step % self._every_n_train_steps == 0)
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation and not trainer.sanity_checking:
            self._after_validation = False
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class BestMetric(L.Callback):
    """Tracks the best value of a validation metric and publishes it as ``<monitor>_best``.

    The value goes to ``trainer.callback_metrics`` (which Lightning carries back from ``ddp_spawn`` workers, unlike
    ``ModelCheckpoint.best_model_score``) and to every logger, so ``train()`` can return it to a sweeper and the
    wandb summary shows it. Its state is saved in checkpoints, so a resumed run keeps the best of the whole run.
    """

    def __init__(self, monitor: str = "val/psnr", mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ConfigError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None
        self.best_step: int | None = None

    @property
    def key(self) -> str:
        return f"{self.monitor}_best"

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self._improves(value):
            self.best, self.best_step = value, trainer.global_step
        trainer.callback_metrics[self.key] = torch.tensor(self.best)
        for logger in trainer.loggers:
            logger.log_metrics({self.key: self.best}, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_step = state_dict["best"], state_dict["best_step"]


class Throughput(L.Callback):
    """Logs ``train/images_per_sec``: training images per second summed over all ranks.

    Measured between the ends of consecutive training steps over the last ``window`` steps, so data loading
    counts and validation does not (the clock restarts after each validation). The image count is the batch the
    model trained on (after the progressive sub-crop), times the number of ranks.
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ConfigError(f"window must be at least 1, got {window}")
        self.window = window
        self._steps: deque[tuple[float, int]] = deque(maxlen=window)
        self._last: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps.clear()
        self._last = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last is not None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not isinstance(outputs, dict) or "images" not in outputs:
            raise TypeError("Throughput needs training_step to return {'loss': ..., 'images': <images trained on>} "
                            f"(kbnet.lit.RestorationModule does); got {type(outputs).__name__}")
        now = time.perf_counter()
        if self._last is None:
            self._last = now
            return
        self._steps.append((now - self._last, int(outputs["images"]) * trainer.world_size))
        self._last = now
        seconds = sum(s for s, _ in self._steps)
        if seconds > 0:
            pl_module.log("train/images_per_sec", sum(n for _, n in self._steps) / seconds)


class DenoisingBaseline(L.Callback):
    """At the end of a Gaussian-denoising run, scores scikit-image's non-local means on the same noisy validation
    images and prints it next to the network's last ``val/psnr``: the demo shows what training bought over a
    classical filter, on the very pixels the network was scored on.

    NLM is run as ``denoise_nl_means(noisy, h=0.8*s, sigma=s, patch_size=5, patch_distance=6, fast_mode=True)``
    with s = σ/255 (scikit-image's recommended setting for a known σ). Other tasks have no such baseline; the
    callback says so once instead of printing a number that would mean nothing.
    """

    def __init__(self, sigma: float | None, task: str) -> None:
        self.sigma = sigma
        self.task = task
        self.result: dict[str, float] | None = None

    def nlm_psnr(self, trainer: L.Trainer) -> tuple[float, int]:
        from skimage.restoration import denoise_nl_means

        s = float(self.sigma) / 255.0
        scores = []
        loaders = trainer.val_dataloaders
        for loader in loaders if isinstance(loaders, list) else [loaders]:
            for item in loader.dataset:
                noisy = item["input"].permute(1, 2, 0).double().numpy()
                target = item["target"].permute(1, 2, 0).double().numpy()
                denoised = denoise_nl_means(noisy, h=0.8 * s, sigma=s, patch_size=5, patch_distance=6,
                                            fast_mode=True, channel_axis=-1).reshape(target.shape)
                mse = float(((denoised.clip(0, 1) - target) ** 2).mean())
                scores.append(10 * math.log10(1.0 / mse))
        return sum(scores) / len(scores), len(scores)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or "val/psnr" not in trainer.callback_metrics:
            return
        if self.task != "gaussian_denoise" or self.sigma is None:
            log.info("no classical baseline for task %s (non-local means is compared on fixed-σ Gaussian "
                     "denoising only)", self.task)
            return
        nlm, count = self.nlm_psnr(trainer)
        kbnet = float(trainer.callback_metrics["val/psnr"])
        self.result = {"kbnet": kbnet, "nlm": nlm}
        print(f"\nval/psnr on the {count} validation images (σ {self.sigma:g}): KBNet {kbnet:.2f} dB, scikit-image "
              f"non-local means {nlm:.2f} dB ({kbnet - nlm:+.2f} dB)", flush=True)
