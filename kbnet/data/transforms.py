"""The training-time geometry shared by a degraded image and its target: pad, crop, one of 8 dihedral maps.

It reproduces the official ``padding`` + ``paired_random_crop`` + ``random_augmentation`` chain:
images smaller than the patch are reflect-padded at the bottom/right with ``cv2.BORDER_REFLECT`` (edge
pixel repeated, not REFLECT_101), then one aligned random square crop, then one of the 8 flips/rotations
drawn uniformly.
albumentations applies each draw to both images through ``additional_targets``.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from kbnet.data._albumentations import A
from kbnet.errors import ConfigError


class PairedTransform:
    """Aligned random ``patch_size`` crop (+ dihedral augmentation) of an (input, target) pair."""

    def __init__(self, patch_size: int, geometric_augs: bool = True) -> None:
        if patch_size < 1:
            raise ConfigError(f"patch_size must be a positive number of pixels, got {patch_size}")
        self.patch_size = patch_size
        steps: list[A.BasicTransform] = [
            A.PadIfNeeded(min_height=patch_size, min_width=patch_size, position="top_left",
                          border_mode=cv2.BORDER_REFLECT),
            A.RandomCrop(height=patch_size, width=patch_size),
        ]
        if geometric_augs:
            steps.append(A.D4(p=1.0))
        self.compose = A.Compose(steps, additional_targets={"target": "image"})

    def __call__(self, inp: np.ndarray, target: np.ndarray,
                 generator: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One random draw; ``generator`` (default: torch's global one) supplies the seed of that draw."""
        if inp.shape != target.shape:
            raise ValueError(f"input and target shapes differ: {inp.shape} vs {target.shape}")
        # albumentations keeps its own random state, which forked DataLoader workers would all share;
        # drawing its seed from torch ties it to the per-worker, per-rank seeds that Lightning sets.
        self.compose.set_random_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator).item()))
        out = self.compose(image=inp, target=target)
        return out["image"], out["target"]
