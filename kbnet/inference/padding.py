"""Reflect padding of any width, as the official test scripts pad before the network.

``torch.nn.functional.pad(mode="reflect")`` (the official choice) mirrors about the edge pixel without repeating
it and refuses pads as wide as the image. The official tiling pads a small image by more than its size, so this
module computes the same mirror indices for any pad width: identical to ``F.pad`` wherever ``F.pad`` works.
"""

from __future__ import annotations

import torch


def reflect_indices(length: int, before: int, after: int, device: torch.device | None = None) -> torch.Tensor:
    """Source index of every position of an axis padded by ``before``/``after`` (mirror without edge repeat)."""
    if length < 1:
        raise ValueError(f"cannot pad an empty axis (length {length})")
    if before < 0 or after < 0:
        raise ValueError(f"pad widths must be >= 0, got {before} and {after}")
    positions = torch.arange(-before, length + after, device=device)
    if length == 1:
        return torch.zeros_like(positions)
    period = 2 * (length - 1)
    folded = positions.remainder(period)
    return torch.where(folded < length, folded, period - folded)


def reflect_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Reflect-pad the last two dimensions of ``x`` by any amounts (wider than the image included)."""
    height, width = x.shape[-2:]
    if top == bottom == left == right == 0:
        return x
    rows = reflect_indices(height, top, bottom, x.device)
    cols = reflect_indices(width, left, right, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad right and bottom so H and W become multiples of ``multiple`` (official ``factor = 8`` step)."""
    if multiple < 1:
        raise ValueError(f"pad multiple must be >= 1, got {multiple}")
    height, width = x.shape[-2:]
    return reflect_pad(x, 0, -height % multiple, 0, -width % multiple)
