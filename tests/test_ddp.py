"""Several processes on CPU (gloo), launched as a user does: DDP equals one process on the same global batch,
and the launches that compose with sweeps (ddp_spawn under -m, torchrun) train and track one run per job.

"Same global batch" needs data whose order does not depend on the number of ranks: ``FixedPairs`` serves fixed
images in file order (no shuffling, cropping or flipping), dealt out round-robin by an unshuffled
``DistributedSampler``, so at every step ranks 0 and 1 together hold exactly the batch the single process
holds. The task is deblurring without progressive stages: no random sub-crop, mixup or noise, whose per-rank
random streams differ from one process's stream by design (the official code seeds each rank separately too).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kbnet.rundir import CONFIG_FILE, RESULT_FILE
from kbnet.training import train
from tests.helpers import ROOT
from tests.helpers.configs import compose_train
from tests.helpers.wandb_records import offline_runs

VAL_IMAGES = 3  # odd: DistributedSampler pads rank 1 with a copy of image 0, which must not be counted twice


class _Pairs(Dataset):
    def __init__(self, inputs: np.ndarray, targets: np.ndarray, prefix: str) -> None:
        self.inputs, self.targets, self.prefix = inputs, targets, prefix

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict:
        return {"input": torch.from_numpy(self.inputs[index]), "target": torch.from_numpy(self.targets[index]),
                "name": f"{self.prefix}{index:02d}"}


class FixedPairs(L.LightningDataModule):
    """Smooth random images and their blurred, noisy versions; training batches in file order.

    ``patch_size`` is the side of every image (the demo experiment sets the key; here it sizes the images).
    """

    def __init__(self, batch_size: int, patch_size: int = 32, train_samples: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size
        rng = np.random.default_rng(0)
        count = train_samples + VAL_IMAGES
        clean = gaussian_filter(rng.random((count, 3, patch_size, patch_size)), sigma=(0, 0, 2, 2))
        clean = (clean - clean.min()) / (clean.max() - clean.min())
        degraded = gaussian_filter(clean, sigma=(0, 0, 1, 1)) + 0.02 * rng.standard_normal(clean.shape)
        clean, degraded = clean.astype(np.float32), degraded.clip(0, 1).astype(np.float32)
        self.train_set = _Pairs(degraded[:train_samples], clean[:train_samples], "train")
        self.val_set = _Pairs(degraded[train_samples:], clean[train_samples:], "val")

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.trainer.world_size > 1:  # the sampler Lightning would add always shuffles training data
            sampler = DistributedSampler(self.train_set, num_replicas=self.trainer.world_size,
                                         rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1)


def equivalence_overrides(log_dir: Path, run_name: str) -> list[str]:
    return [
        f"paths.log_dir={log_dir}", f"run_name={run_name}", "logger=csv", "task=defocus_deblur",
        "task.progressive=null", "~data", f"+data._target_={__name__}.FixedPairs", "data.patch_size=32",
        "model=kbnet_s_tiny", "+model.width=8", "global_batch_size=8", "trainer.accelerator=cpu",
        "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
        "~callbacks.model_summary", "~callbacks.val_images", "callbacks.periodic_checkpoint.every_n_train_steps=3",
    ]


def logged(run_dir: Path) -> dict[str, list[float]]:
    """Every metric of the run's metrics.csv, in step order."""
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    return {key: [float(row[key]) for row in rows if row[key]] for key in rows[0] if key not in ("epoch", "step")}


def run_cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    result = run_cli(["train.py", *equivalence_overrides(tmp_path, "ddp"), "strategy=ddp", "trainer.devices=2"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "global batch 8 = 4 per device x 2 devices x 1 nodes" in result.stdout + result.stderr
    ddp_dir, single_dir = tmp_path / "defocus_deblur" / "ddp", tmp_path / "defocus_deblur" / "single"
    single = train(compose_train(*equivalence_overrides(tmp_path, "single"), f"paths.output_dir={single_dir}"))

    assert (ddp_dir / CONFIG_FILE).is_file() and (ddp_dir / RESULT_FILE).is_file()
    ddp_metrics, single_metrics = logged(ddp_dir), logged(single_dir)
    # train/loss is the mean over the global batch (averaged over the ranks), val/* the mean over the 3 images,
    # each counted once. Tolerance: float32 sums in another order (batch 4 + all-reduce vs batch 8) differ by
    # ~1e-7 relative (1.5e-6 measured on the gradient norm after 3 steps); 1e-5 leaves margin and still catches a
    # rank's share logged as the whole (1e-3 here) or a padded image counted twice (whole dB).
    for key in ("train/loss", "train/grad_norm", "train/lr", "val/psnr", "val/ssim", "val/psnr_input"):
        assert len(ddp_metrics[key]) == len(single_metrics[key]) > 0, key
        np.testing.assert_allclose(ddp_metrics[key], single_metrics[key], rtol=1e-5, err_msg=key)
    assert single["val/psnr_best"] == pytest.approx(single_metrics["val/psnr"][-1], rel=1e-6)

    ddp_ckpt = torch.load(ddp_dir / "checkpoints" / "last.ckpt", weights_only=False)
    single_ckpt = torch.load(single_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ddp_ckpt["global_step"] == single_ckpt["global_step"] == 3
    for name, value in single_ckpt["state_dict"].items():  # measured: at most 1.2e-7 apart
        torch.testing.assert_close(ddp_ckpt["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)


TINY_DEMO = ["model=kbnet_s_tiny", "+model.width=8", "data.train_size=64", "data.val_size=48", "data.train_repeat=4",
             "data.patch_size=32", "task.progressive.patch_sizes=[16,16,24,24,32,32]", "global_batch_size=16",
             "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
             "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
             "~callbacks.progress_bar", "~callbacks.model_summary",
             "callbacks.periodic_checkpoint.every_n_train_steps=2"]


@pytest.mark.slow
def test_ddp_spawn_under_multirun_trains_every_job_with_two_processes(tmp_path: Path) -> None:
    result = run_cli(["train.py", "-m", "seed=1,2", "strategy=ddp_spawn", f"paths.log_dir={tmp_path}",
                      "run_name=spawn", "logger=[wandb]", *TINY_DEMO], timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert output.count("global batch 16 = 8 per device x 2 devices x 1 nodes") == 2
    sweep_dir = tmp_path / "multirun" / "spawn"
    for job in ("0", "1"):
        outcome = json.loads((sweep_dir / job / RESULT_FILE).read_text())
        assert outcome["status"] == "completed" and outcome["best_val_psnr"] > 0
        assert Path(outcome["best_checkpoint"]).is_file()
        (run,) = offline_runs(sweep_dir / job / "wandb")  # created in the main process, logged by the workers
        assert run.exit_code == 0 and {"train/loss", "val/psnr", "val/psnr_best"} <= run.history_keys


@pytest.mark.slow
def test_torchrun_launch_trains_one_run_with_two_processes(tmp_path: Path) -> None:
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "train.py", "strategy=ddp",
            f"paths.log_dir={tmp_path}", "run_name=torchrun", "logger=[wandb]", *TINY_DEMO]
    result = run_cli(args, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (run_dir,) = (tmp_path / "gaussian_denoise").iterdir()
    assert run_dir.name == "torchrun" and (run_dir / CONFIG_FILE).is_file()
    assert json.loads((run_dir / RESULT_FILE).read_text())["status"] == "completed"
    (run,) = offline_runs(run_dir / "wandb")
    assert run.exit_code == 0 and "val/psnr" in run.history_keys
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
