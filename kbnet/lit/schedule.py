"""The official step schedules, rescaled to any run length: the learning-rate curve and the progressive stages.

The paper trains for 300k iterations; its stage lengths (LR periods 92k + 208k, progressive stages 92k/64k/48k/
36k/36k/24k) are kept in the configs as the paper's numbers and rescaled here to ``trainer.max_steps``, so a short
run keeps the same shape and a 300k run reproduces the official boundaries exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate

from kbnet.errors import ConfigError


def scaled_boundaries(periods: Sequence[int], max_steps: int) -> list[int]:
    """Cumulative period ends rescaled from ``sum(periods)`` to ``max_steps``; the last one is ``max_steps``."""
    if max_steps <= 0:
        raise ConfigError(f"max_steps must be positive for a step-based schedule, got {max_steps} "
                          "(set trainer.max_steps)")
    if not periods or any(int(p) != p or p <= 0 for p in periods):
        raise ConfigError(f"periods must be a non-empty list of positive integers, got {list(periods)}")
    total = sum(periods)
    return [round(end * max_steps / total) for end in accumulate(periods)]


def stage_index(iteration: int, boundaries: Sequence[int]) -> int:
    """The official lookup: the first stage whose cumulative end is >= ``iteration`` (the last one beyond)."""
    for index, end in enumerate(boundaries):
        if iteration <= end:
            return index
    return len(boundaries) - 1


def cosine_restart_lr(step: int, boundaries: Sequence[int], base_lr: float, eta_mins: Sequence[float]) -> float:
    """BasicSR's ``CosineAnnealingRestartCyclicLR`` (restart weights 1) at scheduler position ``step``.

    In each period the LR falls from ``base_lr`` to that period's ``eta_min`` along a half cosine. The paper's
    first period has ``eta_min == base_lr``, i.e. a constant LR. Positions past the end hold the last ``eta_min``
    (the official scheduler crashes there).
    """
    if len(eta_mins) != len(boundaries):
        raise ConfigError(f"lr_schedule: {len(eta_mins)} eta_mins for {len(boundaries)} periods")
    step = min(step, boundaries[-1])
    index = stage_index(step, boundaries)
    start = boundaries[index - 1] if index else 0
    length = max(boundaries[index] - start, 1)
    eta_min = eta_mins[index]
    return eta_min + 0.5 * (base_lr - eta_min) * (1 + math.cos(math.pi * (step - start) / length))


def lr_lambda(max_steps: int, periods: Sequence[int], base_lr: float,
              eta_mins: Sequence[float]) -> Callable[[int], float]:
    """Multiplier for ``torch.optim.lr_scheduler.LambdaLR`` stepped once per optimizer step.

    Lightning steps the scheduler after each optimizer step, so optimizer step k (0-based) runs at scheduler
    position k. The official loop calls ``scheduler.step()`` from iteration 2 on, so its iteration i (1-based)
    also runs at position i - 1: both meet with no extra shift, and step k here equals official iteration k + 1.
    """
    boundaries = scaled_boundaries(periods, max_steps)
    if base_lr <= 0:
        raise ConfigError(f"the base learning rate must be positive, got {base_lr}")
    return lambda step: cosine_restart_lr(step, boundaries, base_lr, eta_mins) / base_lr


@dataclass(frozen=True)
class Stage:
    """One progressive-learning stage as it runs on one device: the patch side and how many loaded samples to use."""

    index: int
    patch_size: int
    batch_size: int


class ProgressiveSchedule:
    """The official progressive patch/batch table, rescaled in time to ``max_steps`` and in batch to the loader.

    ``batch_sizes`` are in the paper's units: per GPU, with the loader yielding ``batch_sizes[0]`` (= 8) samples.
    On a device whose loader yields B samples, stage j uses ``batch_sizes[j] * B / batch_sizes[0]`` of them, so the
    global batch per stage keeps the paper's proportions (64, 40, 24, 16, 8, 8 for a global batch of 64).
    """

    def __init__(self, iters: Sequence[int], patch_sizes: Sequence[int], batch_sizes: Sequence[int],
                 max_steps: int) -> None:
        if not len(iters) == len(patch_sizes) == len(batch_sizes):
            raise ConfigError(f"progressive: iters, patch_sizes and batch_sizes must have one entry per stage, got "
                              f"{len(iters)}, {len(patch_sizes)} and {len(batch_sizes)}")
        if any(p <= 0 for p in patch_sizes) or any(b <= 0 for b in batch_sizes):
            raise ConfigError(f"progressive: patch and batch sizes must be positive, got {list(patch_sizes)} "
                              f"and {list(batch_sizes)}")
        if batch_sizes[0] != max(batch_sizes):
            raise ConfigError(f"progressive.batch_sizes[0] is the full loaded batch and must be the largest, got "
                              f"{list(batch_sizes)}")
        self.boundaries = scaled_boundaries(iters, max_steps)
        self.patch_sizes = [int(p) for p in patch_sizes]
        self.batch_sizes = [int(b) for b in batch_sizes]

    def device_batch_sizes(self, loader_batch: int) -> list[int]:
        """Samples used per stage on a device whose loader yields ``loader_batch``; error if not whole numbers."""
        reference = self.batch_sizes[0]
        if any(b * loader_batch % reference for b in self.batch_sizes):
            needed = reference // math.gcd(reference, *self.batch_sizes)
            raise ConfigError(f"the per-device batch {loader_batch} cannot keep the progressive proportions "
                              f"{self.batch_sizes}: it must be a multiple of {needed} "
                              "(global_batch_size = per-device batch x devices x nodes)")
        return [b * loader_batch // reference for b in self.batch_sizes]

    def stage(self, step: int, loader_batch: int) -> Stage:
        """The stage that optimizer step ``step`` (0-based, = official iteration step + 1) trains in."""
        index = stage_index(step + 1, self.boundaries)
        return Stage(index, self.patch_sizes[index], self.device_batch_sizes(loader_batch)[index])
