"""KBNet backbones as plain ``nn.Module``s (no Lightning or Hydra), presets, weight loading and counting."""

from kbnet.models.kbnet_l import KBNetL
from kbnet.models.kbnet_s import KBNetS
from kbnet.models.registry import PRESETS, create_model, list_models
from kbnet.models.weights import WeightLoadError, load_weights, read_checkpoint

__all__ = ["PRESETS", "KBNetL", "KBNetS", "WeightLoadError", "create_model", "list_models", "load_weights",
           "read_checkpoint"]
