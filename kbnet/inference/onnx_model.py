"""An exported ``.onnx`` KBNet run by onnxruntime behind the ``nn.Module`` interface the ``Restorer`` uses.

The session holds its own weights; this module only converts tensors, so restore and evaluation score a deployed
file with exactly the code paths (padding, tiling, protocols) they use for PyTorch models. ``kbnet-export`` writes
the model's preset, config, channels and size multiple into the file's metadata; a file without them (another
tool's export) still runs if its input is (N, C, H, W) with a fixed C.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kbnet.errors import UserError

METADATA_PREFIX = "kbnet."
ONNX_SUFFIX = ".onnx"


class OnnxModelError(UserError):
    """An ONNX file that cannot be run as the requested model, or onnxruntime missing."""


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise OnnxModelError("running an .onnx model needs onnxruntime, which is not installed: "
                             "pip install -e '.[export]' (or pip install onnxruntime)") from err
    return onnxruntime


def providers_for(device: str) -> list[str]:
    """onnxruntime providers for ``auto`` (CUDA when onnxruntime has it), ``cpu`` or ``cuda[:N]``."""
    available = import_onnxruntime().get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise OnnxModelError(f"device {device} asked for an .onnx model, but this onnxruntime has no CUDA "
                                 f"provider (available: {', '.join(available)}); install onnxruntime-gpu or use "
                                 "--device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise OnnxModelError(f"device must be auto, cpu or cuda[:N], got {device!r}")


class OnnxModel(nn.Module):
    """(B, C, H, W) float tensors in and out through an onnxruntime session; inputs and outputs stay on the host."""

    def __init__(self, session: Any, path: Path) -> None:
        super().__init__()
        self.session = session
        self.path = path
        inputs = session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise OnnxModelError(f"{path}: expected one (N, C, H, W) image input, the graph has inputs "
                                 f"{[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        self.metadata = {k[len(METADATA_PREFIX):]: v for k, v in
                         session.get_modelmeta().custom_metadata_map.items() if k.startswith(METADATA_PREFIX)}
        channels = self.metadata.get("channels", inputs[0].shape[1])
        if not isinstance(channels, int | str) or not str(channels).isdigit():
            raise OnnxModelError(f"{path}: the input {self.input_name} has no fixed channel count "
                                 f"(shape {inputs[0].shape})")
        self.channels = int(channels)
        self.size_multiple = int(self.metadata.get("size_multiple", 1))
        self.min_side = int(self.metadata.get("min_side", 1))
        self.preset = self.metadata.get("preset")
        self.providers = session.get_providers()

    @classmethod
    def load(cls, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
             threads: int | None = None) -> OnnxModel:
        """A session on ``path`` (``threads``: onnxruntime's intra-op threads; default: its own choice)."""
        path = Path(path)
        ort = import_onnxruntime()
        if not path.is_file():
            raise OnnxModelError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as err:
            raise OnnxModelError(f"cannot load {path} with onnxruntime: {type(err).__name__}: {err}") from err
        return cls(session, path)

    @property
    def config(self) -> dict[str, Any] | None:
        """The model config written by ``kbnet-export`` (what rebuilds the PyTorch model), if any."""
        config = self.metadata.get("config")
        return None if config is None else json.loads(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"{self.path} takes (N, {self.channels}, H, W) images, got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_side:
            raise ValueError(f"{self.path} needs height and width ≥ {self.min_side}, got {tuple(x.shape[-2:])}")
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(out).to(x.device)

    def extra_repr(self) -> str:
        return f"{self.path}, preset={self.preset}, channels={self.channels}, providers={self.providers}"
