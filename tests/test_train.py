"""``train(cfg)`` end to end on the real config tree: every task, run directories, resume, errors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from kbnet.data import DatasetNotFoundError
from kbnet.rundir import CONFIG_FILE
from kbnet.tracking import WANDB_ID_FILE
from kbnet.training import train
from tests.helpers.configs import compose_train, tiny_run_overrides

pytestmark = pytest.mark.usefixtures("single_thread")


class WeightsProbe(L.Callback):
    """Saves the backbone weights training starts from."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save({k: v.clone() for k, v in pl_module.net.state_dict().items()}, self.path)


@pytest.mark.parametrize(("task", "model", "logger"), [
    ("gaussian_denoise_gray", "kbnet_s_tiny", "wandb"),
    ("gaussian_denoise_blind", "kbnet_s_tiny", "none"),
    ("real_denoise", "kbnet_s_tiny", "csv"),
    ("derain", "kbnet_l_tiny", "none"),
    ("defocus_deblur", "kbnet_l_tiny", "none"),
    ("motion_deblur", "kbnet_s_tiny", "tensorboard"),
])
def test_few_step_run_per_task_writes_a_complete_run_directory(task: str, model: str, logger: str,
                                                                tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    metrics = train(compose_train(*tiny_run_overrides(run_dir, model), f"task={task}", f"logger={logger}"))
    assert metrics["val/psnr"] > 0 and metrics["val/psnr_input"] > 0
    assert (run_dir / CONFIG_FILE).is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert Path(metrics["best_checkpoint"]).is_file()
    assert sorted(p.name for p in (run_dir / "val_images").iterdir())[0].startswith("step0000002_")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["net_config"]["name"] == model
    if logger == "csv":
        assert "val/psnr" in (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    if logger == "tensorboard":
        assert list((run_dir / "tensorboard" / "version_0").glob("events.out.tfevents.*"))
    if logger == "wandb":
        run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
        assert list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def test_init_weights_start_from_a_previous_run(tmp_path: Path) -> None:
    first = tmp_path / "first"
    train(compose_train(*tiny_run_overrides(first)))
    start = torch.load(first / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    probe = tmp_path / "probe.pt"
    train(compose_train(*tiny_run_overrides(tmp_path / "second"), f"init_weights={first}/checkpoints/last.ckpt",
                        "trainer.max_steps=1", "trainer.val_check_interval=1",
                        f"+callbacks.probe={{_target_:tests.test_train.WeightsProbe,path:'{probe}'}}"))
    loaded = torch.load(probe, weights_only=False)
    for name, value in loaded.items():
        torch.testing.assert_close(value, start[f"net.{name}"], rtol=0, atol=0)


def test_last_checkpoint_holds_the_final_step_off_the_interval(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(compose_train(*tiny_run_overrides(run_dir), "trainer.max_steps=3"))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_missing_dataset_error_names_path_layout_script_and_demo(tmp_path: Path) -> None:
    overrides = [*tiny_run_overrides(tmp_path / "run", demo_data=False), "task=real_denoise", "data=sidd",
                 "data.num_workers=0",
                 "data.patch_size=32", f"paths.data_dir={tmp_path / 'nowhere'}"]
    with pytest.raises(DatasetNotFoundError) as error:
        train(compose_train(*overrides))
    message = str(error.value)
    for expected in (str(tmp_path / "nowhere"), "input_crops", "prepare_sidd.py", "data=demo"):
        assert expected in message
    assert not (tmp_path / "run" / CONFIG_FILE).exists()


def test_unknown_and_inconsistent_settings_are_rejected(tmp_path: Path) -> None:
    overrides = tiny_run_overrides(tmp_path / "run")
    with pytest.raises(ValueError, match=r"unknown top-level config key\(s\) \['max_step'\]"):
        train(compose_train(*overrides, "+max_step=10"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sigmas'\] in the task config"):
        train(compose_train(*overrides, "+task.sigmas=[15]"))
    with pytest.raises(ValueError, match="multiple of 8"):
        train(compose_train(*overrides, "global_batch_size=12"))
    with pytest.raises(ValueError, match="data.patch_size"):
        train(compose_train(*overrides, "data.patch_size=24"))
    assert not (tmp_path / "run" / CONFIG_FILE).exists()
    with pytest.raises(ValueError, match="no training step ran"):
        train(compose_train(*overrides, "trainer.limit_train_batches=0"))
