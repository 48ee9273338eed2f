"""Code the tests share (no tests here): reference tensors, configs and runs, checkpoints, KBA cases, readers of
what runs wrote."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (the tests run from a checkout)."""
