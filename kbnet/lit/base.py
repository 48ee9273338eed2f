"""The shared KBNet training recipe as one LightningModule base; task modules override only what differs.

Recipe (the official one): AdamW over all backbone parameters, the official per-step cosine-restart LR, gradient-norm
clipping (``trainer.gradient_clip_val``), progressive patch/batch stages sub-cropped on the device, L1 loss, and
validation by per-image PSNR/SSIM on clamped outputs (which fixes the official unclamped-peak bug).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DistributedSampler

from kbnet.errors import ConfigError, UserError
from kbnet.lit.augment import progressive_crop, step_rng
from kbnet.lit.ema import EMA
from kbnet.lit.losses import build_loss
from kbnet.lit.resume import apply_optimizer_config
from kbnet.lit.schedule import ProgressiveSchedule, lr_lambda
from kbnet.metrics import ImageMean, psnr_torch, ssim_torch, to_y_uint8_levels
from kbnet.models.padding import pad_to_multiple
from kbnet.rundir import checkpoint_step

log = logging.getLogger(__name__)

UNSAFE_PRECISIONS = ("16-mixed", "16-true")


class NonFiniteGradientError(UserError, RuntimeError):
    """The loss or the gradients became NaN/inf; raised before the optimizer step so the weights stay good."""


class RestorationModule(L.LightningModule):
    """Trains and validates an injected image-restoration backbone with the KBNet recipe.

    Args:
        net: the backbone, (B, C, H, W) in [0, 1] -> same shape. Kept as ``self.net``.
        net_config: the resolved model config (``_target_: kbnet.models.create_model``, ``name``, overrides),
            saved in the checkpoint so ``hydra.utils.instantiate(hparams["net_config"])`` rebuilds the backbone.
        optimizer: a ``_target_`` node for the optimizer, instantiated with ``params=``.
        lr_schedule: ``{periods, eta_mins}`` of BasicSR's cosine-restart schedule, periods in the paper's
            iterations (rescaled to ``trainer.max_steps``); ``None`` keeps the LR constant.
        loss: name of the pixel loss (``kbnet.lit.losses.LOSSES``).
        progressive: ``{iters, patch_sizes, batch_sizes}`` stage table (see ``ProgressiveSchedule``); ``None``
            trains on the loaded patches and batch as they come.
        ema_decay: keep an exponential moving average of the weights and validate with it; ``None`` = off.
        seed: seeds the per-step random draws (crops, mixup, noise) together with the rank and the step.
        val_pad_multiple: validation inputs are reflect-padded to this multiple (official ``pad_test``: 8).
        task_name: the task's name (``task.name``: derain, gaussian_denoise, ...), saved in the checkpoint so evaluation
            can refuse to score it with another task's protocol.
    """

    metrics_on_y: ClassVar[bool] = False
    """Score validation on the 8-bit-rounded MATLAB Y channel (deraining protocol) instead of RGB."""

    def __init__(self, net: nn.Module, net_config: Mapping[str, Any], *, optimizer: Mapping[str, Any],
                 lr_schedule: Mapping[str, Sequence[float]] | None = None, loss: str = "l1",
                 progressive: Mapping[str, Sequence[int]] | None = None, ema_decay: float | None = None,
                 seed: int = 100, val_pad_multiple: int = 8, task_name: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.loss_fn = build_loss(loss)
        self.ema = EMA(net, ema_decay) if ema_decay is not None else None
        self.progressive: ProgressiveSchedule | None = None
        self._stage_index = -1
        self._last_loss: torch.Tensor | None = None
        self._val_means: dict[str, ImageMean] = {}

    # ----------------------------------------------------------------------------------------------- setup
    def _max_steps(self) -> int:
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps <= 0:
            raise ConfigError("trainer.max_steps must be a positive number of steps: the LR schedule and the "
                              f"progressive stages are fractions of it (got {max_steps})")
        return max_steps

    def setup(self, stage: str) -> None:
        if self.trainer.precision in UNSAFE_PRECISIONS:
            raise ConfigError(f"trainer.precision={self.trainer.precision} is not supported: KBNet is not "
                              "float16-safe (spandrel marks it half-unsafe, bfloat16-safe); use bf16-mixed or 32-true")
        if self.ema is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ConfigError("module.ema_decay is not supported with strategy=fsdp (the EMA copy would be "
                              "sharded); use ddp or set module.ema_decay=null")
        if stage == "fit" and self.hparams.progressive is not None:
            self.progressive = ProgressiveSchedule(**self.hparams.progressive, max_steps=self._max_steps())

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = instantiate(self.hparams.optimizer, params=params)
        config: dict[str, Any] = {"optimizer": optimizer}
        schedule = self.hparams.lr_schedule
        if schedule is not None:
            multiplier = lr_lambda(self._max_steps(), schedule["periods"], optimizer.defaults["lr"],
                                   schedule["eta_mins"])
            config["lr_scheduler"] = {"scheduler": LambdaLR(optimizer, multiplier), "interval": "step",
                                      "frequency": 1, "name": "lr"}
        return config

    # -------------------------------------------------------------------------------------------- training
    def transform_train_pair(self, inp: torch.Tensor, target: torch.Tensor,
                             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Task hook after the progressive crop (noise synthesis, mixup); the base recipe has none."""
        return inp, target

    def prepare_train_batch(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Progressive sub-crop and the task's transforms, drawn from this step's random stream."""
        inp, target = batch["input"], batch["target"]
        rng = step_rng(self.hparams.seed, self.global_rank, self.global_step)
        if self.progressive is not None:
            stage = self.progressive.stage(self.global_step, target.shape[0])
            if stage.index != self._stage_index:
                self._stage_index = stage.index
                if self.global_rank == 0:
                    log.info("step %d: progressive stage %d/%d, %dx%d patches, %d of %d samples per device",
                             self.global_step, stage.index + 1, len(self.progressive.patch_sizes),
                             stage.patch_size, stage.patch_size, stage.batch_size, target.shape[0])
            inp, target = progressive_crop(inp, target, stage.batch_size, stage.patch_size, rng)
            self.log("train/patch_size", float(stage.patch_size), batch_size=stage.batch_size)
        return self.transform_train_pair(inp, target, rng)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        """The loss, and the number of images trained on (after the progressive sub-crop) for throughput.

        ``train/loss`` is averaged over the ranks (one scalar all-reduce per step), so with several devices it is
        the loss of the global batch, not rank 0's share of it.
        """
        inp, target = self.prepare_train_batch(batch)
        loss = self.loss_fn(self.net(inp), target)
        self._last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True, batch_size=target.shape[0], sync_dist=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=target.shape[0])
        return {"loss": loss, "images": target.shape[0]}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip like the official ``clip_grad_norm_(params, 0.01)`` and stop on a NaN/inf gradient norm.

        The check runs after DDP's all-reduce (every rank sees the same norm, so all stop together) and before
        the optimizer step, so a non-finite loss never reaches the weights or a checkpoint.
        """
        params = [p for p in self.parameters() if p.grad is not None]
        clip_norm = bool(gradient_clip_val) and gradient_clip_algorithm == "norm"
        if clip_norm and isinstance(self.trainer.strategy, FSDPStrategy):
            norm = self.trainer.model.clip_grad_norm_(gradient_clip_val)
        elif clip_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            if gradient_clip_val:
                self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if not torch.isfinite(norm):
            raise NonFiniteGradientError(self._non_finite_message(norm))
        self.log("train/grad_norm", norm)

    def _non_finite_message(self, norm: torch.Tensor) -> str:
        """What happened and the way out that exists: a resume only when a checkpoint was saved."""
        lr = self.hparams.optimizer.get("lr")
        lower = f"module.optimizer.lr={lr / 10:g}" if isinstance(lr, int | float) else "a lower module.optimizer.lr"
        if self.trainer.precision != "32-true":
            lower += " or trainer.precision=32-true"
        head = (f"non-finite gradient norm ({norm.item()}) at step {self.global_step} (loss "
                f"{None if self._last_loss is None else self._last_loss.item()}): training stopped before the "
                "update of this step")
        saved = {Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
                 for cb in self.trainer.checkpoint_callbacks
                 if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath}
        saved = sorted((checkpoint_step(path), path) for path in saved if path.is_file())
        if saved and saved[-1][0] < self.global_step:
            step, path = saved[-1]
            return (f"{head}. The last checkpoint, {path}, holds the weights of step {step}: resume from it with "
                    f"resume=true {lower} (an optimizer setting given on resume applies from the resumed step)")
        if saved:
            return (f"{head}. The last checkpoint, {saved[-1][1]}, holds the weights of this very step, which "
                    "produced it, so resuming it would stop here again: start a new run with "
                    f"{lower}, or with init_weights= set to an earlier checkpoint of this run")
        return (f"{head}. No checkpoint was saved before it, so there is nothing to resume: start a new run with "
                f"{lower}")

    def on_train_start(self) -> None:
        """The configured optimizer settings win over those a resume restored (``kbnet.lit.resume``)."""
        configs = self.trainer.lr_scheduler_configs
        changes = apply_optimizer_config(self.trainer.optimizers[0], configs[0].scheduler if configs else None,
                                         self.hparams.optimizer)
        for name, (old, new) in changes.items():
            log.warning("module.optimizer.%s is %s from step %d on (the checkpoint had %s)", name, new,
                        self.global_step, old)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.net)

    def on_fit_end(self) -> None:
        """Lightning ends a fit without any batch quietly; a run that trained nothing is an error here."""
        if self.trainer.global_step == 0 and not self.trainer.fast_dev_run:
            raise ConfigError(
                "no training step ran: the training loader yields no batch on a device. Either "
                "trainer.limit_train_batches is 0, or the training set split over "
                f"{self.trainer.world_size} processes has fewer samples than the per-device batch "
                "(incomplete batches are dropped): use more data (e.g. the data config's repeat count) or a "
                "smaller global_batch_size")

    # ------------------------------------------------------------------------------------------ validation
    def restore(self, inp: torch.Tensor) -> torch.Tensor:
        """Reflect-pad to ``val_pad_multiple`` (as evaluation does, images smaller than the pad included), run the
        (EMA) backbone, crop back, clamp to [0, 1]."""
        net = self.ema.module if self.ema is not None else self.net
        height, width = inp.shape[-2:]
        return net(pad_to_multiple(inp, self.hparams.val_pad_multiple))[..., :height, :width].clamp(0, 1)

    def image_metrics(self, pred: torch.Tensor, target: torch.Tensor,
                      with_ssim: bool = True) -> dict[str, torch.Tensor]:
        """Per-image PSNR (and SSIM), data range 1, of clamped predictions; on the rounded Y channel if asked."""
        pred, target = pred.float().clamp(0, 1), target.float()
        if self.metrics_on_y:
            pred, target = to_y_uint8_levels(pred), to_y_uint8_levels(target)
        metrics = {"psnr": psnr_torch(pred, target, data_range=1.0)}
        if with_ssim:
            metrics["ssim"] = ssim_torch(pred, target, data_range=1.0)
        return metrics

    def _val_prefixes(self, dataloader_idx: int) -> list[str]:
        """``val`` for the first validation set (the monitored one), plus ``val/<name>`` when there are several."""
        names = list(getattr(self.trainer.datamodule, "val_set_names", None) or [])
        prefixes = ["val"] if dataloader_idx == 0 else []
        if len(names) > 1:
            prefixes.append(f"val/{names[dataloader_idx]}")
        elif dataloader_idx > 0:
            prefixes.append(f"val/set{dataloader_idx}")
        return prefixes

    def _unpadded(self, batch_size: int, batch_idx: int, dataloader_idx: int) -> torch.Tensor:
        """Which samples of a validation batch are real rather than ``DistributedSampler`` padding.

        With several ranks, Lightning deals the validation set out with a ``DistributedSampler``, which appends
        copies of the first samples so every rank gets as many: the last sample of each rank from
        ``len(dataset) % world_size`` on is such a copy. Counting it would weigh that image twice in ``val/*``.
        """
        keep = torch.ones(batch_size, dtype=torch.bool)
        loaders = self.trainer.val_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, Sequence) else loaders
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
            real = len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
            first = batch_idx * loader.batch_size
            keep = torch.arange(first, first + batch_size) < real
        return keep

    def on_validation_epoch_start(self) -> None:
        self._val_means = {}

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per-image metrics, added to each metric's running mean (``ImageMean``) without the padded samples."""
        inp, target = batch["input"], batch["target"]
        restored = self.restore(inp)
        metrics = self.image_metrics(restored, target)
        metrics["psnr_input"] = self.image_metrics(inp, target, with_ssim=False)["psnr"]
        keep = self._unpadded(target.shape[0], batch_idx, dataloader_idx).to(target.device)
        for prefix in self._val_prefixes(dataloader_idx):
            for key, values in metrics.items():
                # A batch of padding only still creates the metric, so every rank ends with the same metric names.
                name = f"{prefix}/{key}"
                if name not in self._val_means:
                    self._val_means[name] = ImageMean().to(target.device)
                self._val_means[name].update(values, keep)
        return {"restored": restored}

    def on_validation_epoch_end(self) -> None:
        """Log each metric's mean over the validation images of all ranks, each image counted once.

        ``ImageMean`` sums the per-image values and counts over the ranks and divides once; Lightning's own
        ``sync_dist`` averaging of per-rank means would need equal image counts per rank (with gloo it even
        truncates the averaged count to an integer), which a validation set split over ranks rarely has.
        """
        for name in sorted(self._val_means):  # the same names, in the same order, on every rank
            self.log(name, self._val_means[name].compute(), prog_bar=name == "val/psnr", sync_dist=False)
