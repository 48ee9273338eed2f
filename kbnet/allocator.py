"""Freed memory kept for reuse: glibc's malloc tuned so that a training loop stops paying page faults.

Why: glibc hands every block above its mmap threshold (128 KiB, rising with use to at most 32 MiB) back to the kernel
when it is freed, and trims the top of its heaps, so the next activation of the same size faults its pages in again,
zero-filled, one 4 KiB page at a time (about 0.8 µs each on a virtual machine): 150 000 to 330 000 faults per
float32 training step of KBNet_s or KBNet_l at 128². Serving every block from the heap and never trimming it lets each
step reuse the pages the previous one freed (1.08–1.14× faster steps). The price is that the process keeps its
high-water mark plus what the heap loses to fragmentation: within 1 % for training's fixed patch shapes, 7–13 % for
inference on images of changing sizes, which is why only training turns it on (``kbnet.training.train``).
``kbnet-bench allocator`` measures both settings side by side.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from kbnet.errors import UserError

ENV = "KBNET_RETAIN_FREED_MEMORY"
"""``1`` (default) or ``0``: ``0`` keeps glibc's default (memory returned to the system as soon as it is freed)."""
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_NEVER = 2**31 - 1
"""``mallopt`` takes an int: a heap top this large (2 GiB) free at once is still returned."""

_retained = False


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def supported() -> bool:
    """Whether this process runs on glibc, whose malloc ``retain_freed_memory`` tunes."""
    return _glibc() is not None


def retain_freed_memory() -> bool:
    """Keep freed memory in the process for reuse (no ``mmap`` blocks, no heap trimming) unless
    ``$KBNET_RETAIN_FREED_MEMORY`` is ``0``; returns whether it is in effect. Process-wide and one-way, so only entry
    points call it; a no-op off glibc (macOS, musl), whose allocators are left as they are."""
    global _retained
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise UserError(f"environment variable {ENV}={value!r}: expected 1 (keep freed memory for reuse, the "
                        "default in training) or 0 (glibc's default)")
    if value == "1" and not _retained and (libc := _glibc()) is not None:
        _retained = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_NEVER))
    return _retained
