"""Operators of KBNet: kernel basis attention (KBA)."""

from kbnet.ops.kba_reference import kba_reference
from kbnet.ops.kernel_basis import kba

__all__ = ["kba", "kba_reference"]
