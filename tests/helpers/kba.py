"""Random KBA cases and the skips for kernels this machine cannot build or run."""

from __future__ import annotations

import pytest
import torch

from kbnet.ops import native


def require_compiler() -> None:
    try:
        native._compiler()
    except native.NativeBuildError as err:
        pytest.skip(str(err))


def require_native() -> None:
    if not native.available():
        pytest.skip(f"native KBA kernels unavailable on this machine: {native.unavailable_reason()}")


def require_bf16() -> None:
    """Skip unless the native KBA kernels are built with their bf16 code (a CPU with AVX512_BF16)."""
    require_native()
    if torch.bfloat16 not in native.native_dtypes():
        pytest.skip(f"this CPU has no AVX512_BF16 (kernels built for {native.instruction_sets()})")


def random_case(b: int = 2, c: int = 8, h: int = 5, w: int = 6, nset: int = 3, k: int = 3, groups: int = 2,
                dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[list[torch.Tensor], int, int]:
    """Random ``x, att, weight, bias`` of a KBA call (requiring gradients), its kernel size and groups."""
    gen = torch.Generator().manual_seed(seed)
    gc = c // groups
    tensors = [torch.randn(b, c, h, w, generator=gen, dtype=dtype),
               torch.randn(b, nset, h, w, generator=gen, dtype=dtype),
               torch.randn(1, nset, c * gc * k * k, generator=gen, dtype=dtype),
               torch.randn(1, nset, c, generator=gen, dtype=dtype)]
    return [t.requires_grad_() for t in tensors], k, groups
