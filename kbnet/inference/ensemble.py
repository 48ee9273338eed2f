"""×8 self-ensemble (geometric test-time augmentation): average the outputs of the 8 flips/rotations.

Not part of the KBNet protocols (the paper uses no test-time augmentation anywhere); offered as an option because
it usually buys a little PSNR at 8× the compute. Each pass maps its output back before averaging, so the ensemble
of any network is exactly equivariant to the 8 transforms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DIHEDRAL_COUNT = 8


def dihedral(x: torch.Tensor, index: int) -> torch.Tensor:
    """Transform ``index`` (0-7) of the last two dims: ``index % 4`` quarter turns, then a left-right flip if >= 4."""
    if not 0 <= index < DIHEDRAL_COUNT:
        raise ValueError(f"dihedral transform index must be in 0..7, got {index}")
    out = torch.rot90(x, index % 4, dims=(-2, -1))
    return out.flip(-1) if index >= 4 else out


def dihedral_inverse(x: torch.Tensor, index: int) -> torch.Tensor:
    """Undo ``dihedral(·, index)``."""
    if not 0 <= index < DIHEDRAL_COUNT:
        raise ValueError(f"dihedral transform index must be in 0..7, got {index}")
    out = x.flip(-1) if index >= 4 else x
    return torch.rot90(out, -(index % 4), dims=(-2, -1))


def self_ensemble(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean over the 8 transforms t of ``t⁻¹(forward(t(x)))``, accumulated in float32; passes run one at a time."""
    total: torch.Tensor | None = None
    for index in range(DIHEDRAL_COUNT):
        out = dihedral_inverse(forward(dihedral(x, index)), index).float()
        total = out if total is None else total + out
    assert total is not None
    return total / DIHEDRAL_COUNT
