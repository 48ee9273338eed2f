"""KBNet: Kernel Basis Network for image restoration (Zhang et al., arXiv 2303.02881)."""

__version__ = "0.1.0"
