"""On-device training augmentations of the official recipe: the progressive sub-crop and mixup.

Both take an explicit ``numpy.random.Generator`` so the modules can derive it from (seed, rank, step): the draws
are then reproducible, differ per rank like the official ``seed + rank``, and survive a resume without saving any
random state.
"""

from __future__ import annotations

import numpy as np
import torch

from kbnet.errors import ConfigError


def step_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The random stream of one optimizer step on one rank."""
    return np.random.default_rng([seed, rank, step])


def progressive_crop(inp: torch.Tensor, target: torch.Tensor, batch_size: int, patch_size: int,
                     rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``batch_size`` random samples and one random ``patch_size`` crop shared by the whole batch.

    Mirrors the official loop: ``random.sample`` of the batch indices, then ``x0 = int((h - p) * random())`` and
    ``y0 = int((w - p) * random())``, the same offset for every sample and for input and target.
    """
    if inp.shape != target.shape:
        raise ValueError(f"input and target batches differ in shape: {tuple(inp.shape)} vs {tuple(target.shape)}")
    loaded, _, height, width = target.shape
    if batch_size > loaded:
        raise ConfigError(f"the progressive stage needs {batch_size} samples but the loader yielded {loaded} "
                          "(the per-device batch comes from global_batch_size)")
    if patch_size > min(height, width):
        raise ConfigError(f"the progressive stage crops {patch_size}x{patch_size} patches but the loader yields "
                          f"{height}x{width}: raise data.patch_size or lower task.progressive.patch_sizes")
    if batch_size < loaded:
        index = torch.from_numpy(rng.choice(loaded, size=batch_size, replace=False)).to(inp.device)
        inp, target = inp[index], target[index]
    if patch_size < height or patch_size < width:
        top = int((height - patch_size) * rng.random())
        left = int((width - patch_size) * rng.random())
        window = (slice(None), slice(None), slice(top, top + patch_size), slice(left, left + patch_size))
        inp, target = inp[window], target[window]
    return inp, target


def mixup(inp: torch.Tensor, target: torch.Tensor, prob: float, beta: float,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``prob``, blend the batch with a permutation of itself (official ``Mixing_Augment``).

    One ``lam ~ Beta(beta, beta)`` and one permutation per batch, shared by input and target. A batch of one is
    left as is, like the official code whose permutation of one sample is the identity.
    """
    if not 0.0 <= prob <= 1.0:
        raise ConfigError(f"mixup probability must be in [0, 1], got {prob}")
    if rng.random() >= prob or target.shape[0] < 2:
        return inp, target
    lam = float(rng.beta(beta, beta))
    perm = torch.from_numpy(rng.permutation(target.shape[0])).to(target.device)
    return lam * inp + (1 - lam) * inp[perm], lam * target + (1 - lam) * target[perm]
