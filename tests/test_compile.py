"""torch.compile: the ``compile`` switch of training and ``kbnet-restore --compile`` run and equal eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kbnet.compile import compile_model
from kbnet.inference import Restorer
from kbnet.models import KBNetS, create_model
from kbnet.restore import build_parser
from kbnet.training import train
from tests.helpers.configs import compose_train, tiny_run_overrides

pytestmark = pytest.mark.usefixtures("single_thread")


def test_compile_model_keeps_class_and_state_dict_names():
    """Compiled in place: checkpoints and ``isinstance`` checks see the same module (compilation is lazy)."""
    net = create_model("kbnet_s_tiny", width=8)
    keys = list(net.state_dict())
    assert compile_model(net) is net
    assert isinstance(net, KBNetS) and list(net.state_dict()) == keys
    assert compose_train("compile=true").compile is True
    assert build_parser().parse_args(["x.png", "-o", "out", "-c", "c.ckpt", "--compile"]).compile


@pytest.mark.slow
def test_compiled_inference_equals_eager():
    torch.manual_seed(0)
    net = create_model("kbnet_s_tiny", width=8).eval()
    x = torch.rand(1, 3, 30, 45)
    eager = Restorer(net, tile=None)(x)
    compiled = Restorer(net, tile=None, compile=True)
    assert compiled._forward is not net
    assert (compiled(x) - eager).abs().max().item() < 1e-5


@pytest.mark.slow
def test_compiled_training_equals_eager(tmp_path: Path):
    """Two steps with ``compile=true`` end at the weights of the same two eager steps (same seed and data)."""
    states = {}
    for flag in ("false", "true"):
        run_dir = tmp_path / flag
        train(compose_train(*tiny_run_overrides(run_dir), f"compile={flag}"))
        states[flag] = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert states["true"].keys() == states["false"].keys()
    for key, value in states["false"].items():
        if value.is_floating_point():
            torch.testing.assert_close(states["true"][key], value, rtol=1e-4, atol=1e-5, msg=key)
