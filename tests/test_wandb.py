"""wandb tracking, checked on what offline runs actually recorded: the ``run-<id>.wandb`` file that
``wandb sync`` uploads (read by ``tests.helpers.wandb_records``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger

import kbnet.lit.callbacks
from kbnet.builders import resolve_config
from kbnet.lit.callbacks import BestMetric, Throughput
from kbnet.rundir import RESULT_FILE
from kbnet.tracking import WANDB_ID_FILE, git_revision
from kbnet.training import train
from tests.helpers.configs import compose_train, hydra_job, tiny_run_overrides, training_loggers
from tests.helpers.wandb_records import offline_runs


def csv_rows_of(log_dir: Path) -> list[dict[str, str]]:
    with (log_dir / "metrics.csv").open() as file:
        return list(csv.DictReader(file))


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    return csv_rows_of(next((run_dir / "csv").glob("version_*")))


def test_offline_run_records_config_git_model_metrics_images_and_best_values(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    metrics = train(compose_train(*tiny_run_overrides(run_dir), "logger=[wandb,csv]", "trainer.max_steps=3",
                                  "trainer.val_check_interval=1"))
    (run,) = offline_runs(run_dir / "wandb")
    assert run.run_id == (run_dir / WANDB_ID_FILE).read_text().strip()
    assert (run.group, run.name, run.exit_code) == ("gaussian_denoise", "test", 0)
    assert run.config["task"]["name"] == "gaussian_denoise" and run.config["model"]["name"] == "kbnet_s_tiny"
    assert run.config["launch"]["git"].get("commit") == git_revision().get("commit")
    assert run.summary["model/parameters_M"] > 0 and run.summary["model/gmacs"] > 0
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_sec", "val/psnr", "val/ssim",
            "val/psnr_best", "val/images/_type"} <= run.history_keys  # image grids are nested records
    psnr = [float(row["val/psnr"]) for row in csv_rows(run_dir) if row.get("val/psnr")]
    assert run.summary["val/psnr"] == {"max": pytest.approx(max(psnr))}
    assert run.summary["val/psnr_best"] == pytest.approx(max(psnr)) == pytest.approx(metrics["val/psnr_best"])
    result = json.loads((run_dir / RESULT_FILE).read_text())
    assert result["status"] == "completed" and result["best_val_psnr"] == pytest.approx(max(psnr))
    assert Path(result["best_checkpoint"]).is_file() and Path(result["last_checkpoint"]).is_file()


def test_a_failing_run_finishes_its_wandb_run_with_a_failure_exit_code(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash at step 1"):
        train(compose_train(*tiny_run_overrides(run_dir), "logger=[wandb]",
                            "+callbacks.crash={_target_:tests.helpers.callbacks.CrashAt,step:1}"))
    (run,) = offline_runs(run_dir / "wandb")
    assert run.exit_code == 1
    result = json.loads((run_dir / RESULT_FILE).read_text())
    assert result == {"status": "failed", "error": "RuntimeError: simulated crash at step 1", "global_step": 1}
    import wandb

    assert wandb.run is None  # the next run of a sweep starts a new wandb run


@pytest.mark.parametrize("offline", [True, False])
def test_checkpoints_are_uploaded_as_artifacts_only_online(offline: bool, tmp_path: Path) -> None:
    cfg = resolve_config(compose_train("logger=wandb", f"logger.wandb.offline={offline}",
                                       f"paths.output_dir={tmp_path}"))
    (logger,) = training_loggers(cfg, tmp_path)
    assert logger._log_model is (not offline)


def test_sweep_jobs_are_separate_wandb_runs_grouped_by_sweep(tmp_path: Path) -> None:
    with hydra_job(RunMode.MULTIRUN, tmp_path / "3", "logger=wandb", "run_name=lr_sweep", job_num=3) as cfg:
        cfg = resolve_config(cfg)
        (logger,) = training_loggers(cfg, tmp_path / "3")
    sweep_dir = Path(cfg.paths.log_dir) / "multirun" / "lr_sweep"
    assert logger._wandb_init["group"] == f"sweep-{sweep_dir.name}" == "sweep-lr_sweep"
    assert logger._wandb_init["name"] == "lr_sweep-3"
    assert logger._wandb_init["config"]["launch"]["sweep_job"] == 3
    assert "run_name=lr_sweep" in logger._wandb_init["config"]["launch"]["overrides"]


def test_other_ranks_neither_create_nor_read_the_wandb_run_id(tmp_path: Path) -> None:
    cfg = resolve_config(compose_train("logger=wandb", f"paths.output_dir={tmp_path}"))
    (logger,) = training_loggers(cfg, tmp_path, is_launcher=False)
    assert logger._wandb_init["id"] is None and not (tmp_path / WANDB_ID_FILE).exists()


class FakeTrainer:
    """The few trainer attributes the dashboard callbacks read."""

    def __init__(self, world_size: int = 1) -> None:
        self.world_size, self.global_step, self.sanity_checking = world_size, 0, False
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.loggers: list[Any] = []


class RecordingModule:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: float) -> None:
        self.logged[name] = value


def test_best_metric_keeps_the_best_value_across_validations_and_resumes(tmp_path: Path) -> None:
    trainer, best = FakeTrainer(), BestMetric("val/psnr", mode="max")
    logger = CSVLogger(tmp_path)
    trainer.loggers = [logger]
    for step, psnr in [(100, 25.0), (200, 27.5), (300, 26.0)]:
        trainer.global_step, trainer.callback_metrics["val/psnr"] = step, torch.tensor(psnr)
        best.on_validation_end(trainer, None)
    assert float(trainer.callback_metrics["val/psnr_best"]) == 27.5 and best.best_step == 200
    resumed = BestMetric("val/psnr", mode="max")
    resumed.load_state_dict(best.state_dict())
    trainer.callback_metrics["val/psnr"] = torch.tensor(27.0)
    resumed.on_validation_end(trainer, None)
    assert float(trainer.callback_metrics["val/psnr_best"]) == 27.5
    logger.save()
    assert [float(row["val/psnr_best"]) for row in csv_rows_of(Path(logger.log_dir))] == [25.0, 27.5, 27.5, 27.5]
    lowest = BestMetric("train/loss", mode="min")
    for loss in (0.3, 0.1, 0.2):
        trainer.callback_metrics["train/loss"] = torch.tensor(loss)
        lowest.on_validation_end(trainer, None)
    assert lowest.best == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'max' or 'min'"):
        BestMetric(mode="best")


def test_throughput_counts_the_images_of_all_ranks_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.5, 1.0, 1.5, 10.0, 10.25])
    monkeypatch.setattr(kbnet.lit.callbacks.time, "perf_counter", lambda: next(clock))
    trainer, module, throughput = FakeTrainer(world_size=2), RecordingModule(), Throughput(window=2)
    throughput.on_train_start(trainer, module)  # t = 0
    throughput.on_train_batch_end(trainer, module, {"loss": 0.1, "images": 4}, None, 0)  # 0.5 s for 2 x 4 images
    assert module.logged["train/images_per_sec"] == pytest.approx(16.0)
    throughput.on_train_batch_end(trainer, module, {"loss": 0.1, "images": 2}, None, 1)  # 0.5 s for 2 x 2
    assert module.logged["train/images_per_sec"] == pytest.approx(12.0 / 1.0)
    throughput.on_train_batch_end(trainer, module, {"loss": 0.1, "images": 2}, None, 2)
    throughput.on_validation_end(trainer, module)  # t = 10: validation time does not count
    throughput.on_train_batch_end(trainer, module, {"loss": 0.1, "images": 2}, None, 3)  # 0.25 s for 2 x 2
    assert module.logged["train/images_per_sec"] == pytest.approx(8.0 / 0.75)
    with pytest.raises(TypeError, match="'images'"):
        throughput.on_train_batch_end(trainer, module, torch.tensor(0.1), None, 4)
