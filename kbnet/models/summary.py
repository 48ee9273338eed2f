"""Parameter and MAC counts of the KBNet presets, in the paper's convention and in full.

The paper (like thop/ptflops) counts only convolutions; the KBA kernel fusion and application and the transposed
attention are matrix products those tools do not see. ``count_macs(..., include_matmul=True)`` adds them, with the
KBA counted in the official formulation (C·gc·k²·(nset+1) + nset·C per pixel). The counts come from
forward hooks on a pass over a tensor on the ``meta`` device, so even large sizes cost no compute.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence

import torch
from torch import nn

from kbnet.cli import user_errors
from kbnet.errors import ConfigError
from kbnet.markdown import markdown_table
from kbnet.models.kbnet_l import TransAttention
from kbnet.models.layers import KernelBasisAttention
from kbnet.models.registry import PRESETS, create_model, list_models


def count_parameters(model: nn.Module) -> int:
    """All parameters, the bare ``nn.Parameter`` kernel bases included (thop misses those)."""
    return sum(p.numel() for p in model.parameters())


def _conv_macs(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    return output[0].numel() * (module.in_channels // module.groups) * kh * kw


def _kba_macs(_module: KernelBasisAttention, inputs: tuple, _output: torch.Tensor) -> int:
    x, att, weight, _bias = inputs
    _, c, h, w = x.shape
    nset, per_basis = att.shape[1], weight.shape[-1]
    return h * w * (per_basis * (nset + 1) + nset * c)


def _attention_macs(module: TransAttention, inputs: tuple, _output: torch.Tensor) -> int:
    _, c, h, w = inputs[0].shape
    return 2 * c * c // module.num_heads * h * w


def count_macs(model: nn.Module, input_shape: Sequence[int], include_matmul: bool = False) -> int:
    """Multiply-accumulates of one forward pass on a (C, H, W) input, batch 1."""
    counters: dict[type, object] = {nn.Conv2d: _conv_macs}
    if include_matmul:
        counters.update({KernelBasisAttention: _kba_macs, TransAttention: _attention_macs})
    total = 0

    def counter(module: nn.Module):  # subclasses count as their base (GroupedConv2d is a Conv2d)
        return next((count for cls, count in counters.items() if isinstance(module, cls)), None)

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += counter(module)(module, inputs, output)

    meta_model = model if next(model.parameters()).is_meta else copy.deepcopy(model).to("meta")
    handles = [m.register_forward_hook(hook) for m in meta_model.modules() if counter(m) is not None]
    try:
        with torch.no_grad():
            meta_model(torch.empty(1, *input_shape, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return total


def model_size(model: nn.Module, input_shape: Sequence[int]) -> dict[str, float]:
    """Parameters (millions) and GMACs of ``model`` for one ``input_shape`` (C, H, W) image: convolutions only, the
    paper's convention, and with the KBA and attention matrix products. Build ``model`` on the meta device."""
    return {"params_M": count_parameters(model) / 1e6,
            "conv_GMACs": count_macs(model, input_shape) / 1e9,
            "full_GMACs": count_macs(model, input_shape, include_matmul=True) / 1e9}


def summary_rows(names: Sequence[str], size: int) -> list[dict[str, object]]:
    rows = []
    for name in names:
        with torch.device("meta"):
            model = create_model(name)
        channels = model.intro.in_channels if hasattr(model, "intro") else model.patch_embed.proj.in_channels
        rows.append({"model": name, **model_size(model, (channels, size, size)),
                     "description": PRESETS[name].description})
    return rows


def format_table(rows: list[dict[str, object]], size: int) -> str:
    header = ["model", "params (M)", f"MACs at {size}², convs only (G) — paper convention",
              "MACs incl. KBA + attention matmuls (G)", "use"]
    return markdown_table(header, [[r["model"], f"{r['params_M']:.2f}", f"{r['conv_GMACs']:.2f}",
                                    f"{r['full_GMACs']:.2f}", r["description"]] for r in rows])


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Parameters and MACs of KBNet presets (batch 1, square input).")
    parser.add_argument("models", nargs="*", default=list_models(), help=f"presets (default: all of {list_models()})")
    parser.add_argument("--size", type=int, default=256, help="input height = width in pixels (default 256)")
    args = parser.parse_args(argv)
    if args.size < 1:
        raise ConfigError(f"--size {args.size}: the input side must be a positive number of pixels (e.g. 256)")
    unknown = [m for m in args.models if m not in PRESETS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; available: {list_models()}")
    print(format_table(summary_rows(args.models, args.size), args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
