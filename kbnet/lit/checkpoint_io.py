"""Checkpoint writes that a kill, a full disk or a crash cannot corrupt (Trainer ``plugins=[AtomicCheckpointIO()]``).

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lies in ``$TMPDIR``
and is moved onto the target on commit; when the checkpoints are on another file system (local ``/tmp``, network
outputs) the move is a copy, and a kill during it leaves a truncated ``last.ckpt``. Here the checkpoint is
serialised into a temporary file in the checkpoint's own directory, fsynced and renamed over the target
(``kbnet.rundir.atomic_writer``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from kbnet.rundir import atomic_writer


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves replace the target atomically; loading and removal are unchanged."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        with atomic_writer(Path(path)) as file:
            torch.save(checkpoint, file)
