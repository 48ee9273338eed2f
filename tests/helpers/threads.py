"""A number of intra-op threads for a block of code, restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``n`` intra-op threads while the block runs: the tiny models gain nothing from more, and a second thread on a
    shared 2-core machine makes training steps several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
