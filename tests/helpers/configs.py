"""The project's real Hydra configs as the tests need them: ``train.yaml`` with overrides, a job as Hydra's
launcher sets it up, tiny two-step runs, and the loggers ``train`` builds."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, open_dict

from kbnet.builders import build_loggers
from kbnet.tracking import training_wandb_spec
from tests.helpers import ROOT

CONFIG_DIR = ROOT / "configs"


def compose_train(*overrides: str) -> DictConfig:
    """The project's ``configs/train.yaml`` composed with command-line style overrides."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@contextmanager
def hydra_job(mode: RunMode, output_dir: Path, *overrides: str, job_num: int = 0) -> Iterator[DictConfig]:
    """The train config as a Hydra job in ``mode`` sees it, with ``HydraConfig`` set (mode, job number, output
    directory, overrides) while the block runs. Yields the job config without its ``hydra`` node, as ``train``
    gets it."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.output_dir={output_dir}", *overrides],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = mode
        cfg.hydra.job.num = job_num
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    try:
        job_cfg = copy.deepcopy(cfg)
        with open_dict(job_cfg):
            del job_cfg["hydra"]
        yield job_cfg
    finally:
        HydraConfig.instance().cfg = None


TINY_MODELS = {"kbnet_s_tiny": ["+model.width=8"], "kbnet_l_tiny": ["+model.dim=12", "+model.heads=[1,1,1,1]"]}


def tiny_run_overrides(run_dir: Path, model: str = "kbnet_s_tiny", demo_data: bool = True) -> list[str]:
    """A run of two steps on a shrunk tiny KBNet (on small demo photos), in ``run_dir``, without logger or bar."""
    demo = ["data.train_size=64", "data.val_size=48", "data.train_repeat=2", "data.patch_size=32"]
    return [
        f"paths.output_dir={run_dir}", "run_name=test", "logger=none", f"model={model}", *TINY_MODELS[model],
        *(demo if demo_data else []),
        "task.progressive.patch_sizes=[16,16,24,24,32,32]", "global_batch_size=8",
        "trainer.accelerator=cpu", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "~callbacks.progress_bar", "~callbacks.model_summary",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
    ]


def training_loggers(cfg: DictConfig, run_dir: Path, is_launcher: bool = True) -> list[Logger]:
    """The loggers ``train`` builds for a run in ``run_dir``."""
    return build_loggers(cfg, functools.partial(training_wandb_spec, cfg, run_dir, is_launcher))


SMALL_DEMO = ("data.val_size=32", "data.train_size=16")
"""Small demo photos, for evaluations that only need a few images."""


def compose_eval(out_dir: Path, *overrides: str) -> DictConfig:
    """``configs/eval.yaml`` with overrides, writing into ``out_dir`` (Hydra's run directory is not set here)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=[f"paths.output_dir={out_dir}", "device=cpu", *overrides])
