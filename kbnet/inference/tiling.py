"""Run a network over an image in overlapping tiles, so image size is bounded by disk, not by memory.

Two write-back rules:

* ``blended_forward`` (the restore CLI): tiles overlap by ``overlap`` pixels; each tile's output is weighted by a
  window that is 0 for the ``overlap // 4`` pixels next to an inner tile edge (where a tile lacks context), then
  ramps linearly to 1. Outputs are summed with their weights and divided by the weight sum, so seams fade instead
  of stepping, and a network whose receptive field is within that margin gives exactly its whole-image output.
* ``official_tiled_forward`` (SenseNoise / DPDD protocol, the official ``patch_forward(skip, padding)``): reflect-pad
  the image, slide ``tile`` windows with stride ``tile - 2 * padding`` (the last one flush with the border), keep
  only the centre of each output (later windows overwrite earlier ones), crop the pad.

``forward`` is any callable from a (B, C, h, w) tile to its restored (B, C', h, w) tile; it decides the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kbnet.models.padding import reflect_pad

Forward = Callable[[torch.Tensor], torch.Tensor]
TileCallback = Callable[[int, int], None]
"""Called after every tile with (tiles done, tiles in total): progress bars."""


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start of every window along an axis: every ``stride`` pixels, the last one flush with the end."""
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be positive, got {tile} and {stride}")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def edge_ramp(overlap: int) -> torch.Tensor:
    """Weights from an inner tile edge inwards: ``overlap // 4`` zeros, then a linear ramp strictly inside (0, 1)."""
    margin = overlap // 4
    ramp_length = overlap - 2 * margin
    ramp = (torch.arange(ramp_length, dtype=torch.float32) + 0.5) / ramp_length
    return torch.cat([torch.zeros(margin), ramp])


def window_weights(size: int, overlap: int, taper_start: bool, taper_end: bool) -> torch.Tensor:
    """1-D blending window of one tile; image borders (no neighbour there) are not tapered."""
    weights = torch.ones(size)
    ramp = edge_ramp(overlap)
    if taper_start:
        weights[: len(ramp)] = ramp
    if taper_end:
        weights[size - len(ramp):] = ramp.flip(0)
    return weights


def _check_tile(tile: int, overlap: int) -> None:
    if overlap < 4:
        raise ValueError(f"tile overlap must be at least 4 pixels, got {overlap}")
    if tile <= 2 * overlap:
        raise ValueError(f"tile size {tile} must exceed twice the overlap ({overlap}): each tile needs an "
                         "untapered centre")


def blended_forward(forward: Forward, x: torch.Tensor, tile: int, overlap: int,
                    on_tile: TileCallback | None = None) -> torch.Tensor:
    """Restore ``x`` (B, C, H, W) tile by tile, blending the overlaps; ``x`` stays where it is (e.g. on the CPU)."""
    _check_tile(tile, overlap)
    height, width = x.shape[-2:]
    rows = window_starts(height, tile, tile - overlap)
    cols = window_starts(width, tile, tile - overlap)
    tile_h, tile_w = min(tile, height), min(tile, width)
    total = len(rows) * len(cols)
    out: torch.Tensor | None = None
    weight_sum = torch.zeros(height, width, device=x.device)
    for i, top in enumerate(rows):
        wy = window_weights(tile_h, overlap, i > 0, i < len(rows) - 1).to(x.device)
        for j, left in enumerate(cols):
            wx = window_weights(tile_w, overlap, j > 0, j < len(cols) - 1).to(x.device)
            piece = forward(x[..., top:top + tile_h, left:left + tile_w]).to(device=x.device, dtype=torch.float32)
            if out is None:
                out = torch.zeros(*piece.shape[:-2], height, width, device=x.device)
            weight = wy[:, None] * wx[None, :]
            out[..., top:top + tile_h, left:left + tile_w] += piece * weight
            weight_sum[top:top + tile_h, left:left + tile_w] += weight
            if on_tile is not None:
                on_tile(i * len(cols) + j + 1, total)
    assert out is not None
    return out / weight_sum


def official_pad(height: int, width: int, tile: int, padding: int) -> int:
    """The official pad width: ``padding``, or enough to make the short side reach one tile plus ``padding``."""
    short = min(height, width)
    return tile - short + padding if short < tile else padding


def official_tiled_forward(forward: Forward, x: torch.Tensor, tile: int = 1024, padding: int = 64,
                           on_tile: TileCallback | None = None) -> torch.Tensor:
    """The official ``patch_forward(x, net, skip=tile, padding=padding)`` with centre-crop write-back.

    An image no larger than one tile in both dimensions is restored whole: the official function would pad it by
    more than its own size (which ``F.pad`` refuses) only to run several tiles over mostly mirrored pixels.
    """
    if padding < 0 or tile <= 2 * padding:
        raise ValueError(f"official tiling needs 0 <= padding < tile / 2, got tile {tile}, padding {padding}")
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        out = forward(x).to(device=x.device, dtype=torch.float32)
        if on_tile is not None:
            on_tile(1, 1)
        return out
    pad = official_pad(height, width, tile, padding)
    padded = reflect_pad(x, pad, pad, pad, pad)
    padded_h, padded_w = padded.shape[-2:]
    stride = tile - 2 * padding
    # The official loops visit range(0, H, stride) and clamp overflowing windows flush with the border, so the
    # flush window can come up more than once; it gives the same pixels each time, so it runs once here.
    rows = list(dict.fromkeys(min(i, padded_h - tile) for i in range(0, padded_h, stride)))
    cols = list(dict.fromkeys(min(j, padded_w - tile) for j in range(0, padded_w, stride)))
    total = len(rows) * len(cols)
    out: torch.Tensor | None = None
    inner = slice(padding, tile - padding)
    out_rows = [slice(top + padding, top + tile - padding) for top in rows]
    out_cols = [slice(left + padding, left + tile - padding) for left in cols]
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            piece = forward(padded[..., top:top + tile, left:left + tile]).to(device=x.device, dtype=torch.float32)
            if out is None:
                out = torch.zeros(*piece.shape[:-2], padded_h, padded_w, device=x.device)
            out[..., out_rows[i], out_cols[j]] = piece[..., inner, inner]
            if on_tile is not None:
                on_tile(i * len(cols) + j + 1, total)
    assert out is not None
    return out[..., pad:pad + height, pad:pad + width]
