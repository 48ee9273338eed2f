"""What a resumed fit changes after Lightning restored the checkpoint: the configured optimizer settings win, and
best checkpoints that the restored top-k state does not know are removed.

Lightning restores the optimizer's ``param_groups`` (learning rate, weight decay, betas) and the scheduler's
``base_lrs`` from the checkpoint, so ``resume=true module.optimizer.lr=1e-4`` would silently keep the old rate
(the NaN stop's advice to resume with a lower rate could not work). ``apply_optimizer_config`` writes the
configured values over the restored ones, from the resumed step on; with an unchanged config it changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

log = logging.getLogger(__name__)


def apply_optimizer_config(optimizer: torch.optim.Optimizer, scheduler: LRScheduler | None,
                           config: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Set every hyper-parameter of the optimizer node ``config`` (``lr``, ``weight_decay``, ``betas``, ...) in
    all parameter groups, and the scheduler's base rate with it; returns ``{name: (old, new)}`` of the changes.

    The learning rate of the current step is recomputed from the new base rate and the schedule's multiplier at
    the scheduler's position, so the schedule keeps its shape and only its scale changes.
    """
    changes: dict[str, tuple[Any, Any]] = {}
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k != "_target_"}
    for group in optimizer.param_groups:
        for name, value in settings.items():
            if name == "lr" and scheduler is not None:
                continue
            if name in group and group[name] != value:
                changes[name] = (group[name], value)
                group[name] = value
    if scheduler is not None and "lr" in settings:
        if not isinstance(scheduler, LambdaLR):
            raise TypeError(f"cannot apply module.optimizer.lr to a {type(scheduler).__name__}; expected LambdaLR")
        base = float(settings["lr"])
        if any(old != base for old in scheduler.base_lrs):
            changes["lr"] = (scheduler.base_lrs[0], base)
        scheduler.base_lrs = [base] * len(optimizer.param_groups)
        rates = [base * multiplier(scheduler.last_epoch) for multiplier in scheduler.lr_lambdas]
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["initial_lr"] = base
            group["lr"] = rate
        scheduler._last_lr = rates
    return changes


def untracked_checkpoints(callback: ModelCheckpoint, tracked: set[Path]) -> list[Path]:
    """Files in ``callback.dirpath`` named like its top-k checkpoints that no checkpoint callback tracks."""
    if callback.dirpath is None or callback.save_top_k == 0:
        return []
    prefix = (callback.filename or "").split("{")[0]
    last = f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return sorted(p for p in Path(callback.dirpath).glob(f"{prefix}*{callback.FILE_EXTENSION}")
                  if p.resolve() not in tracked and p.name != last)


class ResumedCheckpoints(L.Callback):
    """After a resume, removes top-k checkpoints written after the restored checkpoint was saved.

    A run killed between saving a new best and saving ``last.ckpt`` leaves a best file that the restored
    ``ModelCheckpoint`` state does not list; ``save_top_k`` would never remove it, so the run would end with
    more bests than it keeps. The resumed run replays those steps and writes its own.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None or not trainer.is_global_zero:
            return
        callbacks = trainer.checkpoint_callbacks
        tracked = {Path(p).resolve() for cb in callbacks if isinstance(cb, ModelCheckpoint)
                   for p in [*cb.best_k_models, cb.best_model_path, cb.last_model_path] if p}
        for callback in callbacks:
            if isinstance(callback, ModelCheckpoint):
                for path in untracked_checkpoints(callback, tracked):
                    log.warning("removing %s: saved after the checkpoint this run resumes from, so unknown to "
                                "its top-%d state; the resumed run saves its own", path, callback.save_top_k)
                    path.unlink()


class EpochBoundaryRestart(L.Callback):
    """Starts the next epoch normally after a resume from a checkpoint saved after an epoch's last batch.

    Lightning 2.6 counts that epoch as finished when it restores such a checkpoint, but keeps its "restarted
    mid-epoch" stage for the next one, which then starts without ``on_train_epoch_start`` and without its
    ``ready``/``started`` progress counts: the resumed run's loop state would differ from the uninterrupted run's,
    and a second restart would misread it. Clearing the stage once the finished epoch is counted (Lightning resets
    it itself after the first epoch otherwise) lets the next epoch start as in the run that never stopped.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        if (loop.restarted_mid_epoch and loop.epoch_loop.restarted_on_train_batch_end
                and loop.epoch_loop.batch_progress.is_last_batch):
            loop.reset_restart_stage()


def resume_callbacks() -> list[L.Callback]:
    """The callbacks every training run needs so that a resume continues exactly (see the classes)."""
    return [ResumedCheckpoints(), EpochBoundaryRestart()]
