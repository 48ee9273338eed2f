"""A training process that can be killed at a chosen point: ``python -m tests.helpers.fault_driver <override> ...``.

The kill is a real ``SIGKILL`` of this process (no handler runs, no file is closed), placed by environment
variables so the faults tests can aim it:

* ``KBNET_KILL_STEP=<step>:<hook>``: at that global step in a Lightning hook (``on_train_batch_start``,
  ``on_before_optimizer_step``: after the backward pass, before the update; ``on_validation_batch_end``: during a
  validation);
* ``KBNET_KILL_SAVE=<n>:<moment>``: inside the n-th checkpoint save (1-based), with ``moment`` ``partial`` (half
  of the bytes written to the temporary file) or ``before_rename`` (the whole temporary written and fsynced, the
  rename not yet done).
"""

from __future__ import annotations

import io
import os
import signal
import sys
from typing import Any

import lightning as L
import torch

from kbnet.rundir import TEMP_MARKER
from kbnet.training import train
from tests.helpers.configs import compose_train

KILL_HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_validation_batch_end")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(L.Callback):
    """SIGKILLs the process in ``hook`` at global step ``step``."""

    def __init__(self, step: int, hook: str) -> None:
        if hook not in KILL_HOOKS:
            raise ValueError(f"hook must be one of {KILL_HOOKS}, got {hook!r}")
        self.step, self.hook = step, hook

    def _maybe_die(self, trainer: L.Trainer, hook: str) -> None:
        if hook == self.hook and trainer.global_step == self.step:
            die()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._maybe_die(trainer, "on_train_batch_start")

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
        self._maybe_die(trainer, "on_before_optimizer_step")

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._maybe_die(trainer, "on_validation_batch_end")


def kill_inside_save(n: int, moment: str) -> None:
    """Patch the checkpoint writer so that the ``n``-th save dies at ``moment``."""
    saves = {"count": 0}
    real_save, real_replace = torch.save, os.replace

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        name = getattr(f, "name", "")
        if isinstance(name, str) and ".ckpt" in name:
            saves["count"] += 1
            if saves["count"] == n and moment == "partial":
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[: buffer.tell() // 2])
                f.flush()
                os.fsync(f.fileno())
                die()
        real_save(obj, f, *args, **kwargs)

    def replace(src: Any, dst: Any) -> None:
        if moment == "before_rename" and TEMP_MARKER in str(src) and str(dst).endswith(".ckpt") \
                and saves["count"] == n:
            die()
        real_replace(src, dst)

    torch.save = save
    os.replace = replace


def main(overrides: list[str]) -> None:
    if spec := os.environ.get("KBNET_KILL_STEP"):
        step, hook = spec.split(":")
        kill = f"{{_target_:tests.helpers.fault_driver.KillAt,step:{step},hook:{hook}}}"
        overrides = [*overrides, f"+callbacks.kill={kill}"]
    if spec := os.environ.get("KBNET_KILL_SAVE"):
        n, moment = spec.split(":")
        kill_inside_save(int(n), moment)
    torch.set_num_threads(1)
    train(compose_train(*overrides))


if __name__ == "__main__":
    main(sys.argv[1:])
