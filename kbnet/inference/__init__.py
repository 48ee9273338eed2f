"""Inference on images of any size: padding, tiling (blended or the official centre-crop scheme), ×8
self-ensemble, memory planning and checkpoint loading, behind one ``Restorer``."""

from kbnet.inference.ensemble import dihedral, dihedral_inverse, self_ensemble
from kbnet.inference.loading import (
    LoadedModel,
    load_model,
    model_channels,
    model_from_checkpoint,
    model_from_official,
    model_size_multiple,
)
from kbnet.inference.memory import MemoryProfile, forward_peak_bytes, plan_tile, profile_model
from kbnet.inference.restorer import Restorer, inference_model, resolve_device
from kbnet.inference.tiling import blended_forward, official_tiled_forward, window_starts

__all__ = [
    "LoadedModel",
    "MemoryProfile",
    "Restorer",
    "blended_forward",
    "dihedral",
    "dihedral_inverse",
    "forward_peak_bytes",
    "inference_model",
    "load_model",
    "model_channels",
    "model_from_checkpoint",
    "model_from_official",
    "model_size_multiple",
    "official_tiled_forward",
    "plan_tile",
    "profile_model",
    "resolve_device",
    "self_ensemble",
    "window_starts",
]
