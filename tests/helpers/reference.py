"""Access to the official reference tensors in ``../shared/reference`` (absent in a user's clone: tests skip)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers import ROOT

REFERENCE_DIR = ROOT.parent / "shared" / "reference"
NETWORK_FILES = ("kbnet_s_small.pt", "kbnet_s_small_light_gray.pt", "kbnet_l_small.pt")


def load_reference(name: str) -> Any:
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(f"official reference tensors not available: {path} is missing (they ship only with the "
                    "project's CI workspace, ../shared/reference)")
    return torch.load(path, weights_only=False)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
