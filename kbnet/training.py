"""``train(cfg)``: one training run from a composed Hydra config (``train.py`` is a thin entry point over it).

What it guarantees around Lightning's ``Trainer.fit``:

* the config is resolved once, in the launching process, and saved to the run directory before anything spawns;
* a run directory (``<log_dir>/<task>/<run_name>``) is never reused unless ``resume=true``, and then training
  continues from its ``last.ckpt`` (same step, optimizer, scheduler, progressive stage) and the same wandb run;
* the global batch is split evenly over devices × nodes, or the run refuses to start;
* launches that cannot work (``ddp`` or torchrun under ``-m``, ranks that could disagree on the run directory)
  are refused before anything is written (``kbnet.sweep``); only rank 0 writes the run directory;
* the wandb run carries the config, git commit, model size, best-metric summary and, when online, the final
  checkpoints, and is finished (with a failure exit code on errors) before the next job of a sweep starts;
* ``result.json`` in the run directory records the outcome (best ``val/psnr``, checkpoints) for sweep summaries;
* the resolved model config travels in the checkpoint so the backbone can be rebuilt from it alone.
* memory freed by one step is kept for the next (``kbnet.allocator``): no page faults for every activation.

``train`` reads as a recipe; its steps live in the module of their job: ``kbnet.rundir`` (the run directory's
checks, saved configs and ``result.json``), ``kbnet.tracking`` (wandb), ``kbnet.builders`` (the objects built from
the config) and ``kbnet.sweep`` (launch checks). Evaluation uses the same run directory, tracking and loggers.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from kbnet.allocator import retain_freed_memory
from kbnet.builders import (
    build_callbacks,
    build_loggers,
    build_module,
    build_net,
    check_launch,
    check_progressive,
    per_device_batch,
    resolve_config,
)
from kbnet.compile import compile_model
from kbnet.config_check import check_train_config
from kbnet.errors import ConfigError
from kbnet.lit.callbacks import BestMetric
from kbnet.lit.checkpoint_io import AtomicCheckpointIO
from kbnet.lit.resume import resume_callbacks
from kbnet.rundir import (
    COMPLETED,
    RESULT_FILE,
    RunLock,
    check_run_dir,
    claim_run_dir,
    completed_result,
    failure_status,
    record_outcome,
    write_json,
)
from kbnet.sweep import check_run_name_agreement, is_launch_process, running_record, unstarted_sweep_job
from kbnet.tracking import describe_model, finish_wandb, model_summary, start_wandb_runs, training_wandb_spec

log = logging.getLogger(__name__)

MONITOR = "val/psnr"
"""The metric that picks the best checkpoint and that ``train`` returns (as ``val/psnr_best``) to sweepers."""


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume) one run; returns the final logged metrics (``val/psnr_best``: the best validation PSNR)
    and the checkpoint paths."""
    check_run_name_agreement(cfg)
    check_train_config(cfg)  # every value's type and range, before anything is written
    cfg = resolve_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    is_launcher = is_launch_process()

    best = BestMetric(MONITOR, mode="max")  # always: it is the value a sweep optimizes
    callbacks = [*build_callbacks(cfg), best, *resume_callbacks()]
    if cfg.resume and unstarted_sweep_job(run_dir):
        cfg.resume = False
    last_ckpt = _last_checkpoint(callbacks) if cfg.resume else None
    if is_launcher:
        check_run_dir(run_dir, cfg.resume, last_ckpt)
    if cfg.resume and (done := completed_result(run_dir, last_ckpt, cfg.trainer.max_steps)) is not None:
        return {**done.get("metrics", {}), "best_checkpoint": done.get("best_checkpoint"),
                "last_checkpoint": done.get("last_checkpoint")}

    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    retain_freed_memory()  # fixed patch shapes: each step reuses the pages the last one freed
    L.seed_everything(cfg.seed, workers=True)
    loggers = build_loggers(cfg, partial(training_wandb_spec, cfg, run_dir, is_launcher))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=[AtomicCheckpointIO()])
    check_launch(trainer)
    batch_size = per_device_batch(cfg.global_batch_size, trainer)
    check_progressive(cfg, trainer.max_steps, batch_size)

    datamodule = instantiate(cfg.data, batch_size=batch_size)
    datamodule.setup("fit")  # missing or mismatched data fails here, before the run directory is marked as used
    module = build_module(cfg, build_net(cfg))
    if cfg.get("compile"):
        compile_model(module.net)

    lock = RunLock(run_dir)
    if is_launcher:
        config_path = claim_run_dir(lock, cfg, running_record())
        summary = model_summary(cfg)
        log.info("run directory %s (config: %s)", run_dir, config_path.name)
        log.info(describe_model(cfg.model.name, summary))
        log.info("global batch %d = %d per device x %d devices x %d nodes", cfg.global_batch_size, batch_size,
                 trainer.num_devices, trainer.num_nodes)

    succeeded = False
    try:
        if is_launcher:
            start_wandb_runs(loggers, summary)
        trainer.fit(module, datamodule=datamodule, ckpt_path=last_ckpt)
        succeeded = True
    except BaseException as error:
        if is_launcher:
            record_outcome(run_dir, {"status": failure_status(error), "error": f"{type(error).__name__}: {error}",
                                     "global_step": trainer.global_step})
            lock.release()
        raise
    finally:
        finish_wandb(loggers, succeeded)

    metrics = _run_result(trainer, callbacks, best)
    if is_launcher:
        try:
            write_json(run_dir / RESULT_FILE, _completed_record(metrics, best.key, trainer.global_step))
        finally:
            lock.release()
    return metrics


def _last_checkpoint(callbacks: list[L.Callback]) -> Path:
    """Where ``resume`` looks: ``last.ckpt`` of the checkpoint callback that saves it."""
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
            return Path(callback.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    raise ConfigError("resume needs a ModelCheckpoint callback with save_last=true and a dirpath in "
                      "callbacks (configs/callbacks/default.yaml has one)")


def _run_result(trainer: L.Trainer, callbacks: list[L.Callback], best: BestMetric) -> dict[str, Any]:
    """What a run reached: its final metrics, best ``val/psnr`` and checkpoints (also after ``ddp_spawn``,
    whose workers hand back the callback metrics and the best checkpoint path but not the callbacks' state)."""
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if best.key not in metrics and best.best is not None:  # a resumed run that did not validate again
        metrics[best.key] = best.best
    monitored = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor == MONITOR]
    metrics["best_checkpoint"] = (monitored[0].best_model_path or None) if monitored else None
    saves_last = any(isinstance(c, ModelCheckpoint) and c.save_last and c.dirpath for c in callbacks)
    last = _last_checkpoint(callbacks) if saves_last else None
    metrics["last_checkpoint"] = str(last) if last is not None and last.is_file() else None
    return metrics


def _completed_record(metrics: dict[str, Any], best_key: str, global_step: int) -> dict[str, Any]:
    """``result.json`` of a completed run, which sweep summaries and a later resume read."""
    return {"status": COMPLETED, "best_val_psnr": metrics.get(best_key), "global_step": global_step,
            "best_checkpoint": metrics["best_checkpoint"], "last_checkpoint": metrics["last_checkpoint"],
            "metrics": {k: v for k, v in metrics.items() if not k.endswith("_checkpoint")}}
