"""``Restorer``: one object that runs a backbone on whole images of any size, on any device.

It owns the choices both the restore CLI and the evaluation protocols make: the device and precision, an optional
reflect pad to a multiple (the official test scripts pad to 8 before the network), tiling (none, automatic from a
memory budget, a fixed blended tile, or the official centre-crop tiling) and the optional ×8 self-ensemble. Images
stay in host memory; only tiles visit the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from kbnet.errors import ConfigError
from kbnet.inference.ensemble import self_ensemble
from kbnet.inference.loading import model_channels, model_size_multiple
from kbnet.inference.memory import (
    MemoryProfile,
    default_budget,
    host_bytes,
    memory_in_use,
    plan_tile,
    profile_model,
    quick_upper_bound,
)
from kbnet.inference.tiling import TileCallback, blended_forward, official_tiled_forward
from kbnet.models.padding import pad_to_multiple
from kbnet.ops import native

TileMode = Literal["blend", "official"]
Precision = Literal["fp32", "bf16"]
AUTO = "auto"


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; asking for a missing GPU is an error."""
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA GPU is available (use --device cpu or auto)")
    return device


def inference_model(model: nn.Module, device: torch.device, precision: Precision) -> nn.Module:
    """``model`` as the restorer runs it, changed in place: on ``device``, in eval mode and, for ``bf16``, with its
    floating-point weights in bfloat16. Under autocast every convolution would otherwise cast its float32 weight
    again on every pass, into fresh memory whose pages fault in: with a KBNet_s on the CPU the casts of the 1×1
    convolutions of the 1024-channel middle blocks take longer than those convolutions. Statistics (layer norms,
    KBA and attention sums) stay float32 inside the kernels either way."""
    model = model.to(device).eval()
    if precision == "bf16":
        return model.to(torch.bfloat16)
    dtypes = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    if dtypes - {torch.float32}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ConfigError(f"precision fp32 needs float32 weights, but the model holds {names} weights (a bf16 "
                          f"Restorer converts its model in place; load the model again for fp32)")
    return model


@dataclass
class Restorer:
    """Restore (1, C, H, W) float images with ``model``.

    Args:
        model: backbone mapping (B, C, H, W) in [0, 1] to the same shape.
        device: where the network runs; inputs and outputs stay on the host.
        precision: ``fp32``, or ``bf16`` autocast (CUDA, or a CPU with AVX512_BF16, where KBA runs in the bf16
            kernels; KBNet is not float16-safe: spandrel, which ships KBNet, marks it half-unsafe and
            bfloat16-safe). ``bf16`` converts the model's weights to bfloat16 in place (see
            ``inference_model``), so the model then needs ``bf16`` restorers.
        tile: ``"auto"`` tiles only when the image would exceed ``max_memory_bytes``; ``None``/0 never tiles; an
            integer tiles at that size (rounded down to the model's size multiple in blend mode).
        tile_overlap: pixels shared by neighbouring tiles (blend) or the centre-crop margin (official).
        tile_mode: ``blend`` (weighted seams) or ``official`` (``patch_forward``: centre crops, reflect pad).
        self_ensemble: average the 8 flips/rotations of every tile.
        pad_multiple: reflect-pad right/bottom to this multiple before anything else (official test step).
        max_memory_bytes: memory the whole process may hold on the device (host RAM for the CPU) during automatic
            tiling; default: what it holds now plus 80 % of the device's free memory.
        compile: run the network through ``torch.compile`` with static shapes (each new tile or image size compiles
            once, see ``kbnet.compile``; the memory planner keeps probing the eager module).
    """

    model: nn.Module = field(repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: Precision = "fp32"
    tile: int | str | None = AUTO
    tile_overlap: int = 64
    tile_mode: TileMode = "blend"
    self_ensemble: bool = False
    pad_multiple: int | None = None
    max_memory_bytes: int | None = None
    compile: bool = False
    _profile: MemoryProfile | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.precision == "bf16" and self.device.type == "cpu" and torch.bfloat16 not in native.native_dtypes():
            raise ConfigError(f"bf16 on the CPU needs the AVX512_BF16 instructions, which this CPU's KBA kernels lack "
                              f"(built for {native.instruction_sets() or native.unavailable_reason()}); use fp32")
        if self.tile_mode not in ("blend", "official"):
            raise ConfigError(f"tile_mode must be blend or official, got {self.tile_mode!r}")
        if self.tile == AUTO and self.tile_mode == "official":
            raise ConfigError("the official tiling needs a fixed tile size (e.g. 1024), not auto")
        if not (self.tile in (AUTO, None) or (isinstance(self.tile, int) and self.tile >= 0)):
            raise ConfigError(f"tile must be 'auto', null/0 (never tile) or a positive size, got {self.tile!r}")
        self.model = inference_model(self.model, self.device, self.precision)
        self.channels = model_channels(self.model)
        self.multiple = model_size_multiple(self.model)
        self._forward = torch.compile(self.model, dynamic=False) if self.compile else self.model

    def budget(self) -> int:
        """Bytes the automatic tiling may plan for (the default is read from the device at first use)."""
        if self.max_memory_bytes is None:
            self.max_memory_bytes = default_budget(self.device)
        return self.max_memory_bytes

    def memory_profile(self) -> MemoryProfile:
        """Peak-memory profile of the model, measured on the first image too large for the quick upper bound."""
        if self._profile is None:
            self._profile = profile_model(self.model, self.channels)
        return self._profile

    def tile_size(self, height: int, width: int) -> int | None:
        """The tile this image will be processed with, or ``None`` for the whole image in one pass."""
        if self.tile in (None, 0):
            return None
        if self.tile != AUTO:
            if self.tile_mode == "official":
                return int(self.tile)
            tile = int(self.tile) // self.multiple * self.multiple
            if tile <= 2 * self.tile_overlap:
                raise ConfigError(f"tile {self.tile} (rounded to the model's multiple of {self.multiple}: {tile}) must "
                                  f"exceed twice the overlap {self.tile_overlap}")
            return None if tile >= max(height, width) else tile
        reserved = memory_in_use(self.device) + (host_bytes(self.channels, height, width)
                                                 if self.device.type == "cpu" else 0)
        if quick_upper_bound(self.model, height, width) + reserved <= self.budget():
            return None
        return plan_tile(self.memory_profile(), height, width, self.budget(), self.multiple, self.tile_overlap,
                         reserved)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        """One pass of the network on a host tensor; the result comes back to the host as float32.

        The copy happens outside inference mode, so callers get an ordinary tensor they may modify in place.
        """
        x = x.to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                     enabled=self.precision == "bf16"):
            out = self._forward(x)
        return out.to("cpu", torch.float32, copy=True)

    def _piece(self, x: torch.Tensor) -> torch.Tensor:
        if self.self_ensemble:
            return self_ensemble(self._network, x)
        return self._network(x)

    def __call__(self, x: torch.Tensor, on_tile: TileCallback | None = None) -> torch.Tensor:
        """Restore a (1, C, H, W) host tensor; the output has its shape, float32, not clamped."""
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f"Restorer takes one image as a (1, C, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise ValueError(f"the model takes {self.channels}-channel images, got {x.shape[1]} channels")
        height, width = x.shape[-2:]
        x = x.float().cpu()
        if self.pad_multiple is not None:
            x = pad_to_multiple(x, self.pad_multiple)
        tile = self.tile_size(*x.shape[-2:])
        if tile is None:
            out = self._piece(x)
            if on_tile is not None:
                on_tile(1, 1)
        elif self.tile_mode == "official":
            out = official_tiled_forward(self._piece, x, tile, self.tile_overlap, on_tile)
        else:
            out = blended_forward(self._piece, x, tile, self.tile_overlap, on_tile)
        return out[..., :height, :width]
