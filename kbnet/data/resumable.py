"""The training loader of an exact resume: its data order *and* its augmentations continue where they stopped.

Lightning saves a training loader's ``state_dict()`` in the checkpoint (``loops.fit_loop.state_dict
.combined_loader``) and loads it on resume when the loader has ``state_dict``/``load_state_dict``; torchdata's
``StatefulDataLoader`` has both. Its state holds the sampler's generator and position, the worker that yields the
next batch and, per worker, the state of a dataset that itself has ``state_dict``/``load_state_dict``.

The augmentations must therefore draw from a random stream that belongs to the dataset rather than from a
worker's global generator, which a resume would re-seed from scratch: ``AugmentationStream`` is that stream, one
per process that fetches samples (each loader worker, or the training process with ``num_workers=0``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

log = logging.getLogger(__name__)

LAYOUT_KEY = "kbnet_layout"
"""Batch size and training-set length, saved beside the loader's state to tell whether it still applies."""


class AugmentationStream:
    """A ``torch.Generator`` for a dataset's augmentations, created on first use in each fetching process.

    Its first seed is drawn from that process's global generator, which Lightning seeds per worker and rank
    (``seed_everything(seed, workers=True)``), so workers draw different augmentations; from then on only the
    stream's own state matters, and that state is what ``state_dict`` hands to the loader's checkpoint.
    """

    def __init__(self) -> None:
        self._generator: torch.Generator | None = None
        self._owner: int | None = None

    def generator(self) -> torch.Generator:
        # A process forked after the stream was created would otherwise share (and repeat) the parent's draws.
        if self._generator is None or self._owner != os.getpid():
            seed = int(torch.randint(0, 2**62, ()).item())
            self._generator = torch.Generator().manual_seed(seed)
            self._owner = os.getpid()
        return self._generator

    def state_dict(self) -> dict[str, Any]:
        used = self._generator is not None and self._owner == os.getpid()
        return {"generator": self._generator.get_state() if used else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["generator"] is None:
            self._generator = self._owner = None
        else:
            self._generator, self._owner = torch.Generator(), os.getpid()
            self._generator.set_state(state["generator"])


class ResumableLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` that resumes a state saved after the last batch of an epoch at the next epoch, and
    starts a new epoch when the batch size or the training set changed since the state was saved.

    Lightning saves a checkpoint after a step and, resuming from one taken after an epoch's last batch, counts
    that epoch as done; a ``StatefulDataLoader`` would still resume *inside* it and yield an empty epoch first,
    which shifts every later epoch number. Here the loaded epoch is run to its end at once (it has no batch
    left), so the next ``iter`` starts the next epoch, with the sampler's generator where the epoch left it.
    A position in an epoch of other batches (a resume with another ``global_batch_size`` or other data) means
    nothing, so such a state is not loaded.
    """

    def _layout(self) -> dict[str, int]:
        return {"batch_size": int(self.batch_size or 1), "samples": len(self.dataset)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), LAYOUT_KEY: self._layout()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop(LAYOUT_KEY, None)
        if saved != self._layout():
            log.warning("the training loader differs from the checkpoint's (%s, now %s): it starts a new epoch "
                        "instead of resuming the saved position", saved, self._layout())
            return
        super().load_state_dict(state_dict)
        main = state_dict.get("_snapshot", {}).get("_main_snapshot", state_dict)
        if main.get("_sampler_iter_yielded", 0) >= len(self):
            for _ in self:
                raise RuntimeError("a training loader state saved at the end of an epoch still yielded a batch")


def resumable_train_loader(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool) -> ResumableLoader:
    """Shuffled, incomplete batches dropped, persistent workers: the training loader, with a resumable state."""
    return ResumableLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
                           pin_memory=pin_memory, persistent_workers=num_workers > 0)
