"""Hydra multirun: jobs in their own directories and wandb runs, the sweep summary, Optuna, refused launches."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kbnet.rundir import CONFIG_FILE, RESULT_FILE
from kbnet.sweep import (
    ROW_FILE,
    SUMMARY_COLUMNS,
    SUMMARY_FILE,
    SweepSummary,
    check_sweep_launch,
    current_sweep_job,
    external_launcher,
    is_launch_process,
)
from kbnet.training import train
from tests.helpers import ROOT
from tests.helpers.configs import CONFIG_DIR, compose_train, hydra_job, tiny_run_overrides
from tests.helpers.wandb_records import offline_runs

DEMO = ["data.train_size=64", "data.val_size=48", "data.train_repeat=2", "data.patch_size=32",
        "task.progressive.patch_sizes=[16,16,24,24,32,32]", "global_batch_size=8", "trainer.accelerator=cpu",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar", "~callbacks.model_summary", "~callbacks.val_images",
        "callbacks.periodic_checkpoint.every_n_train_steps=2"]
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "WORLD_SIZE",
                    "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SUBMITIT_EXECUTOR")


class CrashForModel(L.Callback):
    """Fails the sweep job that trains ``crash_model``, after its wandb run has started."""

    def __init__(self, model: str, crash_model: str) -> None:
        self.crash = model == crash_model

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if self.crash and trainer.global_step == 1:
            raise RuntimeError("simulated crash of this job")


@pytest.fixture
def clean_launch_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No launcher variables from the machine running the tests; each test sets the ones it simulates."""
    for key in LAUNCH_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def run_train_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def summary_rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / SUMMARY_FILE).open() as file:
        return list(csv.DictReader(file))


def test_multirun_jobs_get_own_directories_wandb_runs_and_a_summary_even_when_one_fails(tmp_path: Path) -> None:
    crash = "+callbacks.crash={_target_:tests.test_sweep.CrashForModel,model:${model.name},crash_model:kbnet_l_tiny}"
    result = run_train_cli("-m", "model=kbnet_s_tiny,kbnet_l_tiny", f"paths.log_dir={tmp_path}", "run_name=sweep",
                           "logger=[wandb]", *DEMO, crash)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "simulated crash of this job" in output, output[-3000:]

    sweep_dir = tmp_path / "multirun" / "sweep"
    first, second = summary_rows(sweep_dir)
    assert first["job"] == "0" and first["status"] == "completed" and first["error"] == ""
    assert "model=kbnet_s_tiny" in first["overrides"].split()
    assert float(first["best_val_psnr"]) > 0 and Path(first["best_checkpoint"]).is_file()
    assert Path(first["best_checkpoint"]).parent == sweep_dir / "0" / "checkpoints"
    assert second["job"] == "1" and second["status"] == "failed" and second["best_val_psnr"] == ""
    assert "model=kbnet_l_tiny" in second["overrides"].split()
    assert second["error"] == "RuntimeError: simulated crash of this job"

    runs = []
    for job in ("0", "1"):
        assert (sweep_dir / job / CONFIG_FILE).is_file()
        (run,) = offline_runs(sweep_dir / job / "wandb")
        runs.append(run)
    assert runs[0].run_id != runs[1].run_id
    assert {run.group for run in runs} == {"sweep-sweep"}
    assert [run.name for run in runs] == ["sweep-0", "sweep-1"]
    assert [run.config["model"]["name"] for run in runs] == ["kbnet_s_tiny", "kbnet_l_tiny"]
    assert [run.exit_code for run in runs] == [0, 1]
    assert json.loads((sweep_dir / "1" / RESULT_FILE).read_text())["status"] == "failed"


@pytest.mark.slow
def test_optuna_search_runs_trials_and_maximizes_the_best_val_psnr(tmp_path: Path) -> None:
    result = run_train_cli("hparams_search=optuna", "hydra.sweeper.n_trials=2",
                           "hydra.sweeper.sampler.n_startup_trials=1", f"paths.log_dir={tmp_path}", "run_name=search",
                           "logger=none", *DEMO)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    sweep_dir = tmp_path / "multirun" / "search"
    rows = summary_rows(sweep_dir)
    assert [row["status"] for row in rows] == ["completed", "completed"]
    for row in rows:
        overrides = dict(item.split("=", 1) for item in row["overrides"].split())
        assert 5e-5 <= float(overrides["module.optimizer.lr"]) <= 2e-3
        assert 1e-6 <= float(overrides["module.optimizer.weight_decay"]) <= 1e-2
    optimum = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert optimum.best_value == pytest.approx(max(float(row["best_val_psnr"]) for row in rows))
    assert set(optimum.best_params) == {"module.optimizer.lr", "module.optimizer.weight_decay"}


def compose_with_hydra(*overrides: str) -> DictConfig:
    """The train config with its ``hydra`` node, as the launcher and sweeper plugins read it."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def test_optuna_search_config_searches_lr_and_weight_decay_for_the_maximum() -> None:
    cfg = compose_with_hydra("hparams_search=optuna")
    sweeper = cfg.hydra.sweeper
    assert cfg.hydra.mode == RunMode.MULTIRUN and sweeper.direction == "maximize" and sweeper.storage is None
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert set(sweeper.params) == {"module.optimizer.lr", "module.optimizer.weight_decay"}
    assert all(value.startswith("tag(log, interval(") for value in sweeper.params.values())


def test_slurm_launcher_starts_one_task_per_gpu_with_ddp() -> None:
    cfg = compose_with_hydra("launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 2)
    assert launcher["submitit_folder"].startswith(f"{cfg.paths.log_dir}/multirun/")
    assert cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.DDPStrategy"
    assert "start_method" not in cfg.trainer.strategy and cfg.trainer.accelerator == "gpu"


# ---------------------------------------------------------------------------------------- refused launches
def test_ddp_under_multirun_is_refused_before_anything_is_written(tmp_path: Path, clean_launch_env) -> None:
    run_dir = tmp_path / "0"
    with hydra_job(RunMode.MULTIRUN, run_dir, *tiny_run_overrides(run_dir)[1:], "strategy=ddp",
                   "trainer.devices=2") as cfg, pytest.raises(ValueError) as error:
        train(cfg)
    message = str(error.value)
    for way in ("#11300", "strategy=ddp_spawn", "torchrun --nproc-per-node=N train.py", "launcher=slurm"):
        assert way in message
    assert not (run_dir / CONFIG_FILE).exists()


@pytest.mark.parametrize(("env", "launcher"), [
    ({"TORCHELASTIC_RUN_ID": "abc", "WORLD_SIZE": "2", "RANK": "0"}, "torchrun"),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, "srun"),
])
def test_a_sweep_started_in_several_processes_is_refused(env: dict[str, str], launcher: str, tmp_path: Path,
                                                         clean_launch_env) -> None:
    for key, value in env.items():
        clean_launch_env.setenv(key, value)
    assert external_launcher() == launcher
    with hydra_job(RunMode.MULTIRUN, tmp_path), pytest.raises(ValueError, match=f"started by {launcher}"):
        check_sweep_launch(relaunches_script=False, processes=2)


def test_submitit_tasks_of_a_sweep_job_are_accepted(tmp_path: Path, clean_launch_env) -> None:
    for key, value in {"SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SUBMITIT_EXECUTOR": "slurm"}.items():
        clean_launch_env.setenv(key, value)
    assert external_launcher() == "submitit" and not is_launch_process()
    with hydra_job(RunMode.MULTIRUN, tmp_path):
        check_sweep_launch(relaunches_script=False, processes=8)


def test_slurm_launcher_without_multirun_is_refused(tmp_path: Path, clean_launch_env) -> None:
    with hydra_job(RunMode.RUN, tmp_path, "launcher=slurm"), pytest.raises(ValueError, match="needs -m"):
        check_sweep_launch(relaunches_script=False, processes=8)


def test_torchrun_needs_a_run_name_all_ranks_agree_on(tmp_path: Path, clean_launch_env) -> None:
    for key, value in {"TORCHELASTIC_RUN_ID": "abc", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        clean_launch_env.setenv(key, value)
    overrides = [o for o in tiny_run_overrides(tmp_path / "run") if not o.startswith("run_name=")]
    with pytest.raises(ValueError, match="pass an explicit run_name"):
        train(compose_train(*overrides))


@pytest.mark.parametrize(("env", "rank0"), [
    ({}, True), ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False),
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False), ({"RANK": "3"}, False), ({"SLURM_PROCID": "2"}, False),
])
def test_only_global_rank_zero_is_the_launch_process(env: dict[str, str], rank0: bool, clean_launch_env) -> None:
    for key, value in env.items():
        clean_launch_env.setenv(key, value)
    assert is_launch_process() is rank0


# ------------------------------------------------------------------------------------------ sweep summary
def job_end(summary: SweepSummary, sweep_dir: Path, num: int, overrides: list[str],
            failure: BaseException | None = None, mode: RunMode = RunMode.MULTIRUN) -> None:
    config = OmegaConf.create({"hydra": {"mode": mode, "job": {"num": num}, "sweep": {"dir": str(sweep_dir)},
                                         "runtime": {"output_dir": str(sweep_dir / str(num))}}})
    status = JobStatus.FAILED if failure is not None else JobStatus.COMPLETED
    summary.on_job_end(config, JobReturn(overrides=overrides, status=status, _return_value=failure or 30.0))


def test_summary_has_one_row_per_job_in_job_order(tmp_path: Path, clean_launch_env) -> None:
    summary = SweepSummary()
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / RESULT_FILE).write_text(json.dumps({"status": "completed", "best_val_psnr": 31.5,
                                                          "best_checkpoint": "/ckpt/best.ckpt"}))
    job_end(summary, tmp_path, 1, ["seed=2", "model=kbnet_s_tiny"])
    job_end(summary, tmp_path, 0, ["seed=1"], failure=FileExistsError("run directory x already holds a run\nmore"))
    rows = summary_rows(tmp_path)
    assert list(rows[0]) == list(SUMMARY_COLUMNS)
    assert rows[0] == {"job": "0", "status": "failed", "best_val_psnr": "", "best_checkpoint": "",
                       "overrides": "seed=1", "run_dir": str(tmp_path / "0"),
                       "error": "FileExistsError: run directory x already holds a run"}
    assert rows[1] == {"job": "1", "status": "completed", "best_val_psnr": "31.5",
                       "best_checkpoint": "/ckpt/best.ckpt", "overrides": "seed=2 model=kbnet_s_tiny",
                       "run_dir": str(tmp_path / "1"), "error": ""}
    summary.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert len(summary_rows(tmp_path)) == 2


def test_summary_ignores_single_runs_and_other_ranks(tmp_path: Path, clean_launch_env) -> None:
    job_end(SweepSummary(), tmp_path, 0, ["seed=1"], mode=RunMode.RUN)
    clean_launch_env.setenv("SLURM_PROCID", "1")
    job_end(SweepSummary(), tmp_path, 1, ["seed=2"])
    assert not list(tmp_path.rglob(ROW_FILE)) and not (tmp_path / SUMMARY_FILE).exists()


def test_the_current_sweep_job_comes_from_hydra(tmp_path: Path) -> None:
    assert current_sweep_job() is None
    with hydra_job(RunMode.MULTIRUN, tmp_path / "2", "run_name=grid", job_num=2):
        job = current_sweep_job()
    assert job is not None and job.num == 2 and job.sweep_dir.name == "grid" and "run_name=grid" in job.overrides
    with hydra_job(RunMode.RUN, tmp_path / "run"):
        assert current_sweep_job() is None
