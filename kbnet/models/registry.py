"""Named presets: the published configurations and tiny CPU variants, built by ``create_model``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kbnet.errors import ConfigError
from kbnet.models.kbnet_l import KBNetL
from kbnet.models.kbnet_s import KBNetS


class UnknownModelError(ConfigError, KeyError):
    """A preset name that is not in ``PRESETS`` (a ``KeyError`` too, as for any unknown name in a mapping)."""

    __str__ = Exception.__str__  # KeyError's own would quote the message


class ModelArgumentError(ConfigError, TypeError):
    """A preset override the backbone's constructor does not take (a ``TypeError``, like a bad keyword)."""


@dataclass(frozen=True)
class Preset:
    """A backbone class, the keyword arguments of one configuration and what it is for."""

    cls: Callable[..., nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


PRESETS: dict[str, Preset] = {
    "kbnet_s": Preset(KBNetS, {}, "KBNet_s default: Gaussian colour denoising (Tables 1-2 of the paper)"),
    "kbnet_s_gray": Preset(KBNetS, {"img_channel": 1}, "KBNet_s default, one channel: Gaussian gray denoising"),
    "kbnet_s_sidd": Preset(KBNetS, {"lightweight": True, "ffn_scale": 1.5},
                           "KBNet_s lightweight, FFN 1.5: SIDD and SenseNoise real denoising"),
    "kbnet_l": Preset(KBNetL, {}, "KBNet_l: deraining (Rain13K) and single-image defocus deblurring (DPDD)"),
    "kbnet_s_tiny": Preset(KBNetS, {"width": 16, "middle_blk_num": 1, "enc_blk_nums": (1, 1, 1),
                                    "dec_blk_nums": (1, 1, 1), "lightweight": True, "ffn_scale": 1.5},
                           "tiny KBNet_s for CPU demos and tests"),
    "kbnet_l_tiny": Preset(KBNetL, {"dim": 24, "num_blocks": (1, 1, 1, 1), "num_refinement_blocks": 1,
                                    "heads": (1, 1, 2, 2)},
                           "tiny KBNet_l for CPU demos and tests"),
}


def list_models() -> list[str]:
    return sorted(PRESETS)


def preset_kwargs(name: str, **overrides: Any) -> tuple[Callable[..., nn.Module], dict[str, Any]]:
    """The class and the full keyword arguments of a preset with ``overrides`` applied, validated."""
    if name not in PRESETS:
        raise UnknownModelError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    preset = PRESETS[name]
    valid = set(inspect.signature(preset.cls).parameters)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ModelArgumentError(f"model {name!r} ({preset.cls.__name__}) has no argument(s) {unknown}; "
                        f"valid: {sorted(valid)}")
    return preset.cls, {**preset.kwargs, **overrides}


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a preset by name, e.g. ``create_model("kbnet_s_sidd")`` or ``create_model("kbnet_l", dim=32)``."""
    cls, kwargs = preset_kwargs(name, **overrides)
    return cls(**kwargs)


@functools.cache
def largest_size_multiple() -> int:
    """The largest ``size_multiple`` of the presets: an image whose sides are multiples of it runs through every
    preset unpadded. Read from copies built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        return max(create_model(name).size_multiple for name in PRESETS)
