"""Padding to a size multiple, shared by the backbones, validation and inference.

KBNet_s zero-pads (as NAFNet's ``check_image_size``), KBNet_l and the official test scripts reflect-pad.
``torch.nn.functional.pad(mode="reflect")`` mirrors about the edge pixel without repeating it and refuses pads as
wide as the image; an image smaller than the pad (a tiny validation crop, a small image under the official tiling)
still has to be padded, so the reflect pad here computes the same mirror indices for any pad width: identical to
``F.pad`` wherever ``F.pad`` works.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

PadMode = Literal["constant", "reflect"]
PAD_MODES: tuple[PadMode, ...] = get_args(PadMode)


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


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: PadMode = "reflect") -> torch.Tensor:
    """Pad right and bottom so H and W become multiples of ``multiple``: with zeros (``constant``) or mirrored
    (``reflect``, the official ``factor = 8`` step of the test scripts). ``x`` itself when nothing is missing."""
    if multiple < 1:
        raise ValueError(f"pad multiple must be >= 1, got {multiple}")
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {', '.join(PAD_MODES)}, got {mode!r}")
    height, width = x.shape[-2:]
    bottom, right = -height % multiple, -width % multiple
    if bottom == right == 0:
        return x
    if mode == "constant":
        return F.pad(x, (0, right, 0, bottom))
    return reflect_pad(x, 0, bottom, 0, right)
