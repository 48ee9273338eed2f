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
"""

from __future__ import annotations

import copy
import logging
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf

from kbnet.compile import compile_model
from kbnet.config_check import check_train_config
from kbnet.errors import ConfigError, ExistingFileError, MissingFileError
from kbnet.lit.base import RestorationModule
from kbnet.lit.callbacks import BestMetric
from kbnet.lit.checkpoint_io import AtomicCheckpointIO
from kbnet.lit.resume import resume_callbacks
from kbnet.lit.schedule import ProgressiveSchedule
from kbnet.models import load_weights
from kbnet.models.summary import count_macs, count_parameters
from kbnet.rundir import (
    COMPLETED,
    RunLock,
    clean_temporaries,
    completed_result,
    failure_status,
    record_outcome,
)
from kbnet.rundir import write_text as write_text_atomically
from kbnet.sweep import (
    RESULT_FILE,
    check_sweep_launch,
    current_sweep_job,
    external_launcher,
    is_launch_process,
    running_record,
    write_json,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WANDB_ID_FILE = "wandb_id.txt"
TOP_LEVEL_KEYS = frozenset({"run_name", "resume", "seed", "global_batch_size", "init_weights", "torch_threads",
                            "compile", "paths", "task", "model", "data", "module", "trainer", "logger", "callbacks"})
TASK_KEYS = frozenset({"name", "channels", "sigma", "sigma_range", "lit_module", "progressive"})
SUMMARY_SIZE = 256
"""MACs are reported at 256x256, the paper's convention."""
MONITOR = "val/psnr"
"""The metric that picks the best checkpoint and that ``train`` returns (as ``val/psnr_best``) to sweepers."""
WANDB_SUMMARIES = {"val/psnr": "max", "val/ssim": "max", "train/loss": "min"}
"""wandb run summaries show these metrics' best value instead of their last one."""
ROOT = Path(__file__).resolve().parents[1]


def check_run_name_agreement(cfg: DictConfig) -> None:
    """Ranks started by torchrun or srun resolve ``run_name`` each on their own: a ``${now:...}`` default could
    put them in different run directories (a second passes between their starts; other nodes start later)."""
    launcher = external_launcher()
    raw_name = OmegaConf.to_container(cfg, resolve=False).get("run_name")
    if launcher in ("torchrun", "srun") and "${now:" in str(raw_name):
        raise ConfigError(
            f"this run was started by {launcher} in several processes, which would each resolve "
            f"run_name={raw_name} at their own time and could disagree on the run directory; pass an explicit "
            "run_name (e.g. run_name=sidd_8gpu) so every rank uses the same one")


def check_config(cfg: DictConfig) -> None:
    """Reject keys nobody reads: a typo in an experiment file must not be silently ignored."""
    unknown = sorted(set(cfg) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"unknown top-level config key(s) {unknown}; known: {sorted(TOP_LEVEL_KEYS)}")
    unknown = sorted(set(cfg.task) - TASK_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in the task config ({cfg.task.name}); known: {sorted(TASK_KEYS)}")


def resolve_config(cfg: DictConfig) -> DictConfig:
    """A resolved copy: interpolations (``${now:...}``, ``${hydra:...}``, ``${task.channels}``) become values here,
    in the launching process, so spawned ranks and the saved config all see the same numbers."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.resolve(cfg)
    check_config(cfg)
    return cfg


def last_checkpoint_path(callbacks: list[L.Callback]) -> Path:
    """Where ``resume`` looks: ``last.ckpt`` of the checkpoint callback that saves it."""
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
            return Path(callback.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    raise ConfigError("resume needs a ModelCheckpoint callback with save_last=true and a dirpath in "
                      "callbacks (configs/callbacks/default.yaml has one)")


def check_run_dir(run_dir: Path, resume: bool, last_ckpt: Path | None) -> None:
    """A new run never lands in a started run's directory; a resume needs something to resume."""
    if resume:
        if last_ckpt is None or not last_ckpt.is_file():
            raise MissingFileError(
                f"resume=true but {last_ckpt} does not exist: the run in {run_dir} has no checkpoint to continue "
                "(it may have stopped before its first checkpoint). Start a new run with another run_name.")
    elif (run_dir / CONFIG_FILE).exists():
        raise ExistingFileError(
            f"run directory {run_dir} already holds a run ({CONFIG_FILE} exists). Pass resume=true to continue it "
            "or choose another run_name; nothing in it is overwritten.")


def unstarted_sweep_job(run_dir: Path) -> bool:
    """A sweep continued with ``resume=true`` resumes the jobs it ran; the ones it never reached (no run in their
    directory yet) start from the beginning."""
    if current_sweep_job() is None or (run_dir / CONFIG_FILE).exists():
        return False
    log.warning("resume=true: sweep job in %s never started, so it starts now", run_dir)
    return True


def save_run_config(cfg: DictConfig, run_dir: Path, resume: bool) -> Path:
    """Save the resolved config (and the command-line overrides); a resume adds ``config.resume<N>.yaml``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    if resume:
        n = 1
        while (path := run_dir / f"config.resume{n}.yaml").exists():
            n += 1
        original = OmegaConf.load(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).exists() else None
        if original is not None:
            changed = _changed_keys(OmegaConf.to_container(original), OmegaConf.to_container(cfg))
            changed = [k for k in changed if k != "resume"]
            if changed:
                log.warning("resuming with a config that differs from %s in: %s", CONFIG_FILE, ", ".join(changed))
    write_text_atomically(path, OmegaConf.to_yaml(cfg))
    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
        write_text_atomically(path.with_name(path.stem + ".overrides.txt"), "\n".join(overrides) + "\n")
    return path


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id kept in the run directory, so a resume logs into the same wandb run."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    write_text_atomically(path, run_id + "\n")
    return run_id


def git_revision(root: Path = ROOT) -> dict[str, Any]:
    """The commit of the code that trains, and whether it had uncommitted changes; empty outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        log.info("%s is not a git checkout (or git is missing): the run records no commit", root)
        return {}


def wandb_spec(spec: dict[str, Any], cfg: DictConfig, run_dir: Path, is_launcher: bool) -> dict[str, Any]:
    """Complete a WandbLogger node: run id, group and name (per sweep job under ``-m``), config, model upload.

    Only rank 0 creates a wandb run, so only it needs (and writes) the run id. ``log_model: true`` means "upload
    the best and last checkpoints at the end when online"; offline runs keep them in the run directory.
    """
    job = current_sweep_job()
    if spec.get("id") is None and is_launcher:
        spec["id"] = wandb_run_id(run_dir)
    if spec.get("group") is None:
        spec["group"] = job.wandb_group if job is not None else cfg.task.name
    if spec.get("name") is None:
        spec["name"] = job.wandb_name if job is not None else cfg.run_name
    if spec.get("offline"):
        spec["log_model"] = False
    spec["config"] = {**OmegaConf.to_container(cfg), "launch": {
        "git": git_revision() if is_launcher else {},
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
        "sweep_job": None if job is None else job.num,
    }}
    return spec


def build_loggers(cfg: DictConfig, run_dir: Path, is_launcher: bool) -> list[Logger]:
    """The loggers of ``cfg.logger``; wandb gets the run id kept in the run directory and the whole config."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        spec = OmegaConf.to_container(node)
        if get_class(spec["_target_"]) is WandbLogger:
            spec = wandb_spec(spec, cfg, run_dir, is_launcher)
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


def model_summary(cfg: DictConfig) -> dict[str, float]:
    """Parameters and MACs of the configured backbone, counted on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        meta_net = instantiate(cfg.model)
    shape = (cfg.task.channels, SUMMARY_SIZE, SUMMARY_SIZE)
    return {"model/parameters_M": count_parameters(meta_net) / 1e6,
            "model/gmacs": count_macs(meta_net, shape) / 1e9,
            "model/gmacs_with_matmul": count_macs(meta_net, shape, include_matmul=True) / 1e9}


def describe_model(name: str, summary: Mapping[str, float]) -> str:
    """One log line from ``model_summary``."""
    return (f"model {name}: {summary['model/parameters_M']:.3f} M parameters, {summary['model/gmacs']:.2f} GMACs "
            f"at {SUMMARY_SIZE}x{SUMMARY_SIZE} counting convolutions (paper convention), "
            f"{summary['model/gmacs_with_matmul']:.2f} GMACs with the KBA/attention matrix products")


def start_wandb_runs(loggers: list[Logger], summary: Mapping[str, float]) -> None:
    """Create the wandb run now (rank 0, after every check passed): best-value summaries and the model size.

    ``ddp_spawn`` workers attach to this run; the other strategies keep logging from this process.
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            for key, direction in WANDB_SUMMARIES.items():
                run.define_metric(key, summary=direction)
            run.summary.update(dict(summary))


def _finish_wandb(loggers: list[Logger], succeeded: bool) -> None:
    """Close the wandb run, with a failure exit code on errors, so a sweep's next job starts a new run."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=0 if succeeded else 1)


def run_result(trainer: L.Trainer, callbacks: list[L.Callback], best: BestMetric) -> dict[str, Any]:
    """What a run reached: its final metrics, best ``val/psnr`` and checkpoints (also after ``ddp_spawn``,
    whose workers hand back the callback metrics and the best checkpoint path but not the callbacks' state)."""
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if best.key not in metrics and best.best is not None:  # a resumed run that did not validate again
        metrics[best.key] = best.best
    monitored = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor == MONITOR]
    metrics["best_checkpoint"] = (monitored[0].best_model_path or None) if monitored else None
    saves_last = any(isinstance(c, ModelCheckpoint) and c.save_last and c.dirpath for c in callbacks)
    last = last_checkpoint_path(callbacks) if saves_last else None
    metrics["last_checkpoint"] = str(last) if last is not None and last.is_file() else None
    return metrics


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
    last_ckpt = last_checkpoint_path(callbacks) if cfg.resume else None
    if is_launcher:
        check_run_dir(run_dir, cfg.resume, last_ckpt)
    if cfg.resume and (done := completed_result(run_dir, last_ckpt, cfg.trainer.max_steps)) is not None:
        return {**done.get("metrics", {}), "best_checkpoint": done.get("best_checkpoint"),
                "last_checkpoint": done.get("last_checkpoint")}

    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    L.seed_everything(cfg.seed, workers=True)
    loggers = build_loggers(cfg, run_dir, is_launcher)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=[AtomicCheckpointIO()])
    check_launch(trainer)
    batch_size = per_device_batch(cfg.global_batch_size, trainer)
    check_progressive(cfg, trainer.max_steps, batch_size)

    datamodule = instantiate(cfg.data, batch_size=batch_size)
    datamodule.setup("fit")  # missing or mismatched data fails here, before the run directory is marked as used
    net = instantiate(cfg.model)
    if cfg.init_weights is not None:
        load_weights(net, cfg.init_weights)
    module = build_module(cfg, net)
    if cfg.get("compile"):
        compile_model(module.net)

    lock = RunLock(run_dir)
    if is_launcher:
        if lock.acquire():
            log.warning("the previous process in %s was killed (its lock was never released)", run_dir)
        clean_temporaries(run_dir)
        config_path = save_run_config(cfg, run_dir, cfg.resume)
        write_json(run_dir / RESULT_FILE, running_record())
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
        _finish_wandb(loggers, succeeded)

    metrics = run_result(trainer, callbacks, best)
    if is_launcher:
        try:
            write_json(run_dir / RESULT_FILE, {
                "status": COMPLETED, "best_val_psnr": metrics.get(best.key), "global_step": trainer.global_step,
                "best_checkpoint": metrics["best_checkpoint"], "last_checkpoint": metrics["last_checkpoint"],
                "metrics": {k: v for k, v in metrics.items() if not k.endswith("_checkpoint")}})
        finally:
            lock.release()
    return metrics
