"""Paper-protocol evaluation: ``evaluate(cfg)`` (behind ``evaluate.py``) and the per-task protocols."""

from kbnet.evaluation.protocols import PROTOCOLS, Protocol, get_protocol
from kbnet.evaluation.runner import evaluate

__all__ = ["PROTOCOLS", "Protocol", "evaluate", "get_protocol"]
