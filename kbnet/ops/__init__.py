"""Operators of KBNet: kernel basis attention (KBA) and the choice of its implementation."""

from kbnet.ops.kba_reference import kba_reference
from kbnet.ops.kernel_basis import IMPLEMENTATIONS, default_impl, kba, use_kba

__all__ = ["IMPLEMENTATIONS", "default_impl", "kba", "kba_reference", "use_kba"]
