"""How much memory a restoration needs, and the largest tile that fits a budget.

The peak memory of a forward pass is measured, not guessed: the model runs once on the ``meta`` device (shapes
only: no compute, no real memory) under a dispatch mode that adds up every tensor allocation and subtracts it when
its storage dies. Two probe sizes give a fixed part (weights, the KBA slab buffers) and a per-pixel part
(activations), and the peak at any size is extrapolated from them. Measured this way, KBNet_s needs about
3.1 KB and KBNet_l about 4.8 KB per pixel in float32 at 1024x1024; the linear fit from the probes underestimates
those by at most 5 %.

Real processes hold more than their live tensors: on the CPU, the process's peak RSS exceeded weights + tracked
tensors by 593 MB for KBNet_s at 768x768 (about one more copy of the weights: oneDNN reorders convolution weights)
and by 256-355 MB for the tiny KBNet_s at 1024-2048 px (scratchpads, allocator fragmentation). The plan therefore
starts from the memory the process already holds (loaded weights included), adds one more copy of the weights and
``RUNTIME_BYTES``, and keeps ``SAFETY_FACTOR`` of headroom on top of the tensors. The probes take seconds
for the full presets, so images that fit even under a generous upper bound (``quick_upper_bound``) skip them.
"""

from __future__ import annotations

import os
import resource
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PROBE_SIZES = (256, 384)
"""Probe sides: large enough that the KBA's row slabs reach their size cap at every level of the presets."""
SAFETY_FACTOR = 1.25
"""Headroom over the extrapolated tensor peak (probe extrapolation error, allocator rounding)."""
RUNTIME_BYTES = 512 * 2**20
"""Backend workspaces and allocator slack beyond the tensors (measured 256-355 MB besides the weight copy)."""
BUDGET_FRACTION = 0.8
"""Share of the currently free memory a restoration may plan to use by default."""
HOST_BUFFERS_PER_CHANNEL = 3
"""Full-image float32 buffers per channel besides the model (input, output sum, result), plus one weight plane."""
BOUND_FLOATS_PER_FEATURE = 64
"""Quick upper bound on the activations: this many float32 values per pixel per first-level feature channel.
The presets need 12 (KBNet_s) and 25 (KBNet_l) at 1024x1024, so images under the bound skip the probe safely."""
BOUND_FIXED_BYTES = 256 * 2**20
"""Quick upper bound on the size-independent buffers (the KBA's row slabs are capped at 64 MiB each)."""


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while the mode is active (views are not counted twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key not in self._refs:
                self._refs[key] = 0
                self._sizes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self._refs[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def forward_peak_bytes(model: nn.Module, channels: int, height: int, width: int) -> int:
    """Peak bytes of tensors created by one batch-1 forward pass at (channels, height, width), input included.

    The weights are swapped for float32 meta tensors for the duration of the call, so the measurement allocates
    nothing and leaves the model untouched wherever it lives; a bfloat16 model is measured as float32 (an upper
    bound for its bf16 autocast pass).
    """
    meta_state = {name: torch.empty_like(t, device="meta", dtype=torch.float32 if t.is_floating_point() else t.dtype)
                  for name, t in [*model.named_parameters(), *model.named_buffers()]}
    x = torch.empty(1, channels, height, width, device="meta")
    tracker = AllocationTracker()
    with torch.inference_mode(), tracker:
        functional_call(model, meta_state, (x,))
    return tracker.peak + x.numel() * x.element_size()


@dataclass(frozen=True)
class MemoryProfile:
    """Tensor peak of a forward pass, ``fixed_bytes + bytes_per_pixel * H * W``, for a model of ``weight_bytes``."""

    weight_bytes: int
    fixed_bytes: float
    bytes_per_pixel: float

    def _constant(self) -> float:
        return SAFETY_FACTOR * (self.weight_bytes + max(self.fixed_bytes, 0.0)) + RUNTIME_BYTES

    def peak(self, height: int, width: int) -> float:
        """Planned bytes for an H x W input on top of the memory in use: a weight copy, tensors, headroom, slack."""
        return self._constant() + SAFETY_FACTOR * self.bytes_per_pixel * height * width

    def max_pixels(self, room: float) -> float:
        """The largest H * W whose planned peak fits ``room`` bytes (inverse of ``peak``)."""
        return (room - self._constant()) / (SAFETY_FACTOR * self.bytes_per_pixel)


def profile_model(model: nn.Module, channels: int, probe_sizes: tuple[int, int] = PROBE_SIZES) -> MemoryProfile:
    """Fit the memory profile of ``model`` from two meta-device probes (a few seconds for the full presets)."""
    small, large = probe_sizes
    if not 0 < small < large:
        raise ValueError(f"probe sizes must be increasing positive sides, got {probe_sizes}")
    peak_small = forward_peak_bytes(model, channels, small, small)
    peak_large = forward_peak_bytes(model, channels, large, large)
    per_pixel = max(peak_large - peak_small, 0) / (large * large - small * small)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return MemoryProfile(weight_bytes=weights, fixed_bytes=peak_small - per_pixel * small * small,
                         bytes_per_pixel=per_pixel)


def quick_upper_bound(model: nn.Module, height: int, width: int) -> float:
    """A cheap, generous bound on the planned peak (as ``MemoryProfile.peak`` counts it), from the first
    convolution's width."""
    features = next((m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 0)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    activations = BOUND_FIXED_BYTES + 4 * BOUND_FLOATS_PER_FEATURE * features * height * width
    return SAFETY_FACTOR * (weights + activations) + RUNTIME_BYTES


def available_memory(device: torch.device) -> int:
    """Bytes free now: GPU memory for CUDA, otherwise the RAM the OS reports as available."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    raise RuntimeError("cannot tell how much memory is available on this system; pass a memory budget "
                       "(--max-memory-gb) or a tile size (--tile)")


def memory_in_use(device: torch.device) -> int:
    """What this process already holds: its resident memory (CPU), or what PyTorch reserved on the GPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_reserved(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return usage if sys.platform == "darwin" else usage * 1024


def default_budget(device: torch.device) -> int:
    """A budget for the whole process: what it holds now plus 80 % of the memory still available."""
    return int(BUDGET_FRACTION * available_memory(device)) + memory_in_use(device)


def host_bytes(channels: int, height: int, width: int) -> int:
    """Full-image buffers the restoration keeps in host RAM next to the model."""
    return 4 * (HOST_BUFFERS_PER_CHANNEL * channels + 1) * height * width


def plan_tile(profile: MemoryProfile, height: int, width: int, budget: float, multiple: int, overlap: int,
              reserved: float = 0.0) -> int | None:
    """``None`` if the whole image fits ``budget - reserved`` bytes, else the largest square tile that does
    (``reserved``: memory in use plus the full-image host buffers).

    Tiles are multiples of ``multiple`` (the model's size multiple, so it needs no internal padding) and larger than
    twice the overlap. Raises ``MemoryError`` when not even the smallest such tile fits.
    """
    room = budget - reserved
    if profile.peak(height, width) <= room:
        return None
    smallest = (2 * overlap // multiple + 1) * multiple
    if profile.peak(smallest, smallest) > room:
        raise MemoryError(
            f"a memory budget of {budget / 2**30:.2f} GB is too small for this model: even a {smallest}x{smallest} "
            f"tile needs {(profile.peak(smallest, smallest) + reserved) / 2**30:.2f} GB; raise the budget "
            "(--max-memory-gb) or lower the overlap")
    return int(profile.max_pixels(room) ** 0.5) // multiple * multiple
