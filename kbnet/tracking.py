"""What a run records about itself in wandb, for training and evaluation alike.

* A training run keeps its wandb run id in the run directory (``wandb_id.txt``), so a resume logs into the same
  wandb run; the jobs of a sweep are one wandb group, each job its own run.
* The run's config carries the launch: git commit (and whether the checkout had uncommitted changes), the
  command-line overrides and the sweep job.
* The summary shows the model size and the best value of the metrics that have one.
* The run is finished, with a failure exit code on errors, before the next job of a sweep starts its own.
"""

from __future__ import annotations

import logging
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from kbnet.models.summary import model_size
from kbnet.rundir import write_text
from kbnet.sweep import current_sweep_job

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id.txt"
WANDB_SUMMARIES = {"val/psnr": "max", "val/ssim": "max", "train/loss": "min"}
"""wandb run summaries show these metrics' best value instead of their last one."""
SUMMARY_SIZE = 256
"""MACs are reported at 256x256, the paper's convention."""
ROOT = Path(__file__).resolve().parents[1]


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id kept in the run directory, so a resume logs into the same wandb run."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    write_text(path, run_id + "\n")
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


def training_wandb_spec(cfg: DictConfig, run_dir: Path, is_launcher: bool, spec: dict[str, Any]) -> dict[str, Any]:
    """Complete a training run's WandbLogger node: run id, group and name (per sweep job under ``-m``), config,
    model upload.

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


def evaluation_wandb_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's WandbLogger node: marked as an evaluation job, uploading no model (it produces none)."""
    return {**spec, "job_type": "eval", "log_model": False}


def model_summary(cfg: DictConfig) -> dict[str, float]:
    """Parameters and MACs of the configured backbone (``kbnet.models.summary.model_size``, on the meta device: no
    memory, no compute), under the names the wandb summary shows."""
    with torch.device("meta"):
        meta_net = instantiate(cfg.model)
    size = model_size(meta_net, (cfg.task.channels, SUMMARY_SIZE, SUMMARY_SIZE))
    return {"model/parameters_M": size["params_M"], "model/gmacs": size["conv_GMACs"],
            "model/gmacs_with_matmul": size["full_GMACs"]}


def describe_model(name: str, summary: Mapping[str, float]) -> str:
    """One log line from ``model_summary``."""
    return (f"model {name}: {summary['model/parameters_M']:.3f} M parameters, {summary['model/gmacs']:.2f} GMACs "
            f"at {SUMMARY_SIZE}x{SUMMARY_SIZE} counting convolutions (paper convention), "
            f"{summary['model/gmacs_with_matmul']:.2f} GMACs with the KBA/attention matrix products")


def start_wandb_runs(loggers: Sequence[Logger], summary: Mapping[str, float]) -> None:
    """Create the wandb run now (rank 0, after every check passed): best-value summaries and the model size.

    ``ddp_spawn`` workers attach to this run; the other strategies keep logging from this process.
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            for key, direction in WANDB_SUMMARIES.items():
                run.define_metric(key, summary=direction)
            run.summary.update(dict(summary))


def finish_wandb(loggers: Sequence[Logger], succeeded: bool) -> None:
    """Close the wandb run, with a failure exit code on errors, so a sweep's next job starts a new run."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=0 if succeeded else 1)
