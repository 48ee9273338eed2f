"""Shared test setup: the repository importable, wandb never online, and the real train config composable."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("KBNET_ROOT", str(ROOT))
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"


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


@pytest.fixture
def single_thread():
    """One intra-op thread for the duration of a test: the tiny models gain nothing from more, and a second
    thread on a shared 2-core machine makes training steps several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def require_bf16() -> None:
    """Skip unless the native KBA kernels are built with their bf16 code (a CPU with AVX512_BF16)."""
    from kbnet.ops import native

    if not native.available():
        pytest.skip(f"native KBA kernels unavailable: {native.unavailable_reason()}")
    if torch.bfloat16 not in native.native_dtypes():
        pytest.skip(f"this CPU has no AVX512_BF16 (kernels built for {native.instruction_sets()})")
