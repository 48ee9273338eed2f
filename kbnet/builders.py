"""The objects of a run, built from its resolved config (loggers, callbacks, the backbone and its LightningModule),
and the checks that need a built trainer: how its processes split the batch, and which launches can work."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf

from kbnet.config_check import TASK_KEYS, TRAIN_KEYS, check_known_keys
from kbnet.errors import ConfigError
from kbnet.lit.base import RestorationModule
from kbnet.lit.schedule import ProgressiveSchedule
from kbnet.models import load_weights
from kbnet.sweep import check_sweep_launch

WandbSpec = Callable[[dict[str, Any]], dict[str, Any]]
"""Completes a WandbLogger node before it is built (``kbnet.tracking``: a training run's or an evaluation's)."""


def resolve_config(cfg: DictConfig) -> DictConfig:
    """A resolved copy: interpolations (``${now:...}``, ``${hydra:...}``, ``${task.channels}``) become values here,
    in the launching process, so spawned ranks and the saved config all see the same numbers."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.resolve(cfg)
    check_known_keys(cfg, TRAIN_KEYS)
    check_known_keys(cfg.task, TASK_KEYS, "key(s)", f" in the task config ({cfg.task.name})")
    return cfg


def build_loggers(cfg: DictConfig, wandb_spec: WandbSpec) -> list[Logger]:
    """The loggers of ``cfg.logger``; a wandb node is completed by ``wandb_spec`` first."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        spec = OmegaConf.to_container(node)
        if get_class(spec["_target_"]) is WandbLogger:
            spec = wandb_spec(spec)
        logger = instantiate(spec, _recursive_=False, _convert_="all")
        if not isinstance(logger, Logger):
            raise TypeError(f"logger.{name} must build a Lightning Logger, got {type(logger).__name__}")
        loggers.append(logger)
    return loggers


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        callback = instantiate(node)
        if not isinstance(callback, L.Callback):
            raise TypeError(f"callbacks.{name} must build a Lightning Callback, got {type(callback).__name__}")
        callbacks.append(callback)
    return callbacks


def build_net(cfg: DictConfig) -> torch.nn.Module:
    """The configured backbone, starting from ``init_weights`` when they are given."""
    net = instantiate(cfg.model)
    if cfg.init_weights is not None:
        load_weights(net, cfg.init_weights)
    return net


def build_module(cfg: DictConfig, net: torch.nn.Module) -> RestorationModule:
    """The task's LightningModule: task arguments (``task.lit_module``) + shared recipe (``module``)."""
    task_args = OmegaConf.to_container(cfg.task.lit_module)
    cls = get_class(task_args.pop("_target_"))
    if not (isinstance(cls, type) and issubclass(cls, RestorationModule)):
        raise TypeError(f"task.lit_module._target_ must be a kbnet.lit.RestorationModule subclass, got {cls}")
    recipe = OmegaConf.to_container(cfg.module)
    clash = sorted(set(task_args) & set(recipe))
    if clash:
        raise ConfigError(f"task.lit_module and module both set {clash}; set each argument in one place")
    progressive = cfg.task.get("progressive")
    return cls(net=net, net_config=OmegaConf.to_container(cfg.model), seed=cfg.seed, task_name=str(cfg.task.name),
               progressive=None if progressive is None else OmegaConf.to_container(progressive),
               **task_args, **recipe)


def check_launch(trainer: L.Trainer) -> None:
    """Refuse launches that cannot work with Hydra's mode (``kbnet.sweep.check_sweep_launch``)."""
    relaunches = isinstance(getattr(trainer.strategy, "launcher", None), _SubprocessScriptLauncher)
    check_sweep_launch(relaunches, trainer.num_devices * trainer.num_nodes)


def per_device_batch(global_batch_size: int, trainer: L.Trainer) -> int:
    """``global_batch_size`` split over devices × nodes; uneven splits are refused, never rounded."""
    processes = trainer.num_devices * trainer.num_nodes
    if global_batch_size <= 0 or global_batch_size % processes:
        raise ConfigError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                          f"{processes} processes ({trainer.num_devices} devices x {trainer.num_nodes} nodes)")
    return global_batch_size // processes


def check_progressive(cfg: DictConfig, max_steps: int, batch_size: int) -> None:
    """Fail at launch, not hours in, when the stage table does not fit the loader's batch or patch size."""
    table = cfg.task.get("progressive")
    if table is None:
        return
    ProgressiveSchedule(**table, max_steps=max_steps).device_batch_sizes(batch_size)
    loader_patch = cfg.data.get("patch_size")
    if loader_patch is not None and max(table.patch_sizes) > loader_patch:
        raise ConfigError(f"task.progressive.patch_sizes go up to {max(table.patch_sizes)} but the loader crops "
                          f"data.patch_size={loader_patch}: raise data.patch_size or lower the stage patch sizes")
