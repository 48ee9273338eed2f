"""Resume: a crashed run continues from last.ckpt at the same step, optimizer state and wandb run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from kbnet.tracking import WANDB_ID_FILE
from kbnet.training import train
from tests.helpers.configs import compose_train, tiny_run_overrides

pytestmark = pytest.mark.usefixtures("single_thread")


class TrainingStateProbe(L.Callback):
    """Saves the step, optimizer and scheduler state the (resumed) training starts from."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save({"global_step": trainer.global_step,
                    "optimizer": trainer.optimizers[0].state_dict(),
                    "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict()}, self.path)


def test_resume_continues_at_the_same_step_with_the_same_optimizer_and_wandb_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    base = [*tiny_run_overrides(run_dir), "logger=[wandb,csv]", "trainer.max_steps=6"]
    with pytest.raises(RuntimeError, match="simulated crash at step 4"):
        train(compose_train(*base, "+callbacks.crash={_target_:tests.helpers.callbacks.CrashAt,step:4}"))
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4
    wandb_id = (run_dir / WANDB_ID_FILE).read_text().strip()

    with pytest.raises(FileExistsError, match="resume=true"):
        train(compose_train(*base))

    probe = tmp_path / "probe.pt"
    metrics = train(compose_train(*base, "resume=true",
                                  f"+callbacks.probe={{_target_:tests.test_train_resume.TrainingStateProbe,path:'{probe}'}}"))
    start = torch.load(probe, weights_only=False)
    assert start["global_step"] == 4
    assert start["scheduler"]["last_epoch"] == saved["lr_schedulers"][0]["last_epoch"] == 4
    for key, state in saved["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(start["optimizer"]["state"][key][name], value, rtol=0, atol=0)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    assert metrics["val/psnr"] > 0
    assert (run_dir / "config.resume1.yaml").is_file()
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == wandb_id
    offline_runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(offline_runs) == 2
    assert len(list((run_dir / "csv").glob("version_*/metrics.csv"))) == 2


def test_resume_without_a_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"last\.ckpt does not exist"):
        train(compose_train(*tiny_run_overrides(tmp_path / "run"), "resume=true"))
