"""Shared test setup: wandb never online, data and outputs below the checkout, and the shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers import ROOT
from tests.helpers.threads import torch_threads

os.environ.setdefault("KBNET_ROOT", str(ROOT))
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread for the duration of a test (see ``torch_threads``)."""
    with torch_threads(1):
        yield
