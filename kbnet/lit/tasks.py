"""One LightningModule per task; each holds only what its task changes in the shared recipe."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from kbnet.data.degradations import gaussian_noise_like
from kbnet.errors import ConfigError
from kbnet.lit.augment import mixup
from kbnet.lit.base import RestorationModule


class DenoiseModule(RestorationModule):
    """Real-image denoising (SIDD): the shared recipe plus mixup, which the official configs enable for denoising.

    ``mixup_prob`` 0.5 and ``mixup_beta`` 1.2 are the official ``Mixing_Augment`` settings (mixup or identity
    chosen by a coin flip, ``lam ~ Beta(1.2, 1.2)``), applied after the progressive crop.
    """

    def __init__(self, net: nn.Module, net_config: dict[str, Any], *, mixup_prob: float = 0.5,
                 mixup_beta: float = 1.2, **recipe: Any) -> None:
        if not 0.0 <= mixup_prob <= 1.0 or mixup_beta <= 0:
            raise ConfigError(f"mixup_prob must be in [0, 1] and mixup_beta positive, got {mixup_prob}, {mixup_beta}")
        super().__init__(net, net_config, **recipe)

    def transform_train_pair(self, inp: torch.Tensor, target: torch.Tensor,
                             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return mixup(inp, target, self.hparams.mixup_prob, self.hparams.mixup_beta, rng)


class GaussianDenoiseModule(DenoiseModule):
    """Gaussian denoising: noise is synthesized on the device, after the crop and before mixup.

    Training batches carry clean patches (input == target). Each step adds ``sigma/255 * N(0, 1)`` to the
    target, with ``sigma`` fixed (the paper's non-blind models, one per σ) or drawn uniformly per sample from
    ``sigma_range`` (blind training). Not clipped, not quantized, as in the official code. Validation batches
    already carry the official seeded noisy inputs.
    """

    def __init__(self, net: nn.Module, net_config: dict[str, Any], *, sigma: float | None = None,
                 sigma_range: Sequence[float] | None = None, **denoise: Any) -> None:
        if (sigma is None) == (sigma_range is None):
            raise ConfigError("gaussian_denoise needs exactly one of task.sigma (fixed σ, e.g. 25) or "
                              f"task.sigma_range (blind, e.g. [0, 50]); got sigma={sigma}, sigma_range={sigma_range}")
        if sigma is not None and sigma < 0:
            raise ConfigError(f"task.sigma must be >= 0 (0-255 units), got {sigma}")
        if sigma_range is not None and (len(sigma_range) != 2 or not 0 <= sigma_range[0] <= sigma_range[1]):
            raise ConfigError(f"task.sigma_range must be [low, high] with 0 <= low <= high, got {list(sigma_range)}")
        super().__init__(net, net_config, **denoise)
        self._checked_clean = False

    def transform_train_pair(self, inp: torch.Tensor, target: torch.Tensor,
                             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._checked_clean:
            if not torch.equal(inp, target):
                raise ConfigError("gaussian_denoise trains on clean patches (input == target in the training "
                                  "batches) and adds the noise itself; the data module delivered degraded inputs")
            self._checked_clean = True
        if self.hparams.sigma_range is not None:
            low, high = self.hparams.sigma_range
            sigma: float | torch.Tensor = torch.from_numpy(rng.uniform(low, high, size=target.shape[0]))
        else:
            sigma = float(self.hparams.sigma)
        generator = torch.Generator(device=target.device).manual_seed(int(rng.integers(2**62)))
        noisy = target + gaussian_noise_like(target, sigma, generator=generator)
        return super().transform_train_pair(noisy, target, rng)


class DerainModule(RestorationModule):
    """Deraining (Rain13K): no mixup; validation on the 8-bit MATLAB Y channel, as the official protocol scores."""

    metrics_on_y = True


class DeblurModule(RestorationModule):
    """Defocus (DPDD) and motion (GoPro) deblurring: the shared recipe unchanged, no mixup, RGB metrics.

    The official defocus configs disable mixup; motion deblurring (absent from the paper) follows them.
    """
