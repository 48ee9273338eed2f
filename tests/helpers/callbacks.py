"""Callbacks that the tests add to real training runs through Hydra overrides (+callbacks.<name>={_target_:...})."""

from __future__ import annotations

import lightning as L


class CrashAt(L.Callback):
    """Simulates a crash (e.g. a pre-empted job) when training reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")
