"""Backbones: official parity, any input size, gradients, bf16, presets, weight loading and its errors."""

from __future__ import annotations

import pytest
import torch

from kbnet.errors import UserError
from kbnet.models import KBNetL, KBNetS, WeightLoadError, create_model, list_models, load_weights
from kbnet.models.padding import pad_to_multiple
from kbnet.models.registry import largest_size_multiple
from kbnet.models.summary import count_macs, count_parameters
from kbnet.models.summary import main as summary_main
from tests.helpers.reference import NETWORK_FILES, load_reference, relative_error

ARCHS = {"KBNet_s": KBNetS, "KBNet_l": KBNetL}
TINY = ("kbnet_s_tiny", "kbnet_l_tiny")


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name).eval()


@pytest.mark.parametrize("filename", NETWORK_FILES)
def test_reproduces_official_network(filename):
    ref = load_reference(filename)
    model = ARCHS[ref["arch"]](**ref["kwargs"])
    load_weights(model, {"params": ref["state_dict"]})
    model.double().eval()
    x = ref["input"].clone().double().requires_grad_()
    out = model(x)
    out.backward(ref["grad_out"])
    assert relative_error(out, ref["output"]) < 1e-6
    assert relative_error(x.grad, ref["grad_input"]) < 1e-6
    params = dict(model.named_parameters())
    for name, grad in ref["grad_params"].items():
        assert relative_error(params[name].grad, grad) < 1e-6, name


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("size", [(17, 23), (8, 8), (5, 40)])
def test_any_input_size(name, size):
    model = tiny(name)
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize(("build", "multiple", "mode"), [
    (lambda: KBNetS(), 16, "constant"),
    (lambda: KBNetS(enc_blk_nums=(1, 1, 1), dec_blk_nums=(1, 1, 1)), 8, "constant"),
    (lambda: KBNetL(), 8, "reflect"),
])
def test_each_backbone_states_its_size_multiple_and_pad_mode(build, multiple, mode):
    with torch.device("meta"):
        model = build()
    assert (model.size_multiple, model.pad_mode) == (multiple, mode)
    assert not any("size_multiple" in k or "pad_mode" in k for k in model.state_dict())  # official keys only


def test_the_presets_largest_size_multiple_is_kbnet_s_four_levels():
    assert largest_size_multiple() == 16


@pytest.mark.parametrize("name", TINY)
def test_images_smaller_than_the_pad_are_padded_as_the_pad_mode_says(name):
    model = tiny(name).double()
    x = torch.rand(1, 3, 3, 5, dtype=torch.float64)
    padded = pad_to_multiple(x, model.size_multiple, model.pad_mode)
    with torch.no_grad():
        assert torch.equal(model(x), model(padded)[:, :, :3, :5])


def test_kbnet_l_padding_leaves_multiples_of_8_untouched():
    """Padding to 8 inside KBNetL equals the official external reflect pad + crop."""
    model = tiny("kbnet_l_tiny").double()
    x = torch.rand(1, 3, 13, 21, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 3), mode="reflect")
    with torch.no_grad():
        assert torch.equal(model(x), model(padded)[:, :, :13, :21])


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_gets_a_gradient(name):
    model = tiny(name).train()
    model(torch.rand(2, 3, 16, 16)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_forward_backward(name):
    model = tiny(name).train()
    x = torch.rand(1, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().mean().backward()
    assert torch.isfinite(y.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_state_dict_round_trip(name, tmp_path):
    model = tiny(name, seed=1)
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    fresh = load_weights(tiny(name, seed=2), path)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"params": sd},
    lambda sd: {"params_ema": sd},
    lambda sd: {"model": sd},
    lambda sd: {"net": {"module." + k: v for k, v in sd.items()}},
    lambda sd: {"state_dict": {"net." + k: v for k, v in sd.items()}, "pytorch-lightning_version": "2.6.6",
                "hyper_parameters": {}},
], ids=["raw", "params", "params_ema", "model", "net-module-prefix", "lightning"])
def test_checkpoint_wrapper_formats(wrap, tmp_path):
    source = tiny("kbnet_s_tiny", seed=1)
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(source.state_dict()), path)
    loaded = load_weights(tiny("kbnet_s_tiny", seed=2), path)
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_explicit_key_picks_ema_weights():
    source, ema = tiny("kbnet_s_tiny", seed=1), tiny("kbnet_s_tiny", seed=3)
    loaded = load_weights(tiny("kbnet_s_tiny", seed=2), {"params": source.state_dict(),
                                                          "params_ema": ema.state_dict()}, key="params_ema")
    assert torch.equal(loaded.intro.weight, ema.intro.weight)


def test_corrupt_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightLoadError, match="broken.pth"):
        load_weights(tiny("kbnet_s_tiny"), path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_weights(tiny("kbnet_s_tiny"), tmp_path / "missing.pth")


@pytest.mark.parametrize("other, cause", [
    (dict(lightweight=False), "lightweight"),
    (dict(ffn_scale=2.0), "ffn_scale"),
    (dict(img_channel=1), "channels"),
    (dict(enc_blk_nums=(1, 2, 1)), "number of blocks"),
])
def test_mismatched_checkpoint_explains_the_cause(other, cause):
    checkpoint = create_model("kbnet_s_tiny", **other).state_dict()
    with pytest.raises(WeightLoadError, match=cause) as err:
        load_weights(tiny("kbnet_s_tiny"), checkpoint)
    assert "does not fit KBNetS" in str(err.value)


def test_non_strict_loads_what_fits():
    checkpoint = create_model("kbnet_s_tiny", ffn_scale=2.0).state_dict()
    model = load_weights(tiny("kbnet_s_tiny"), checkpoint, strict=False)
    assert torch.equal(model.intro.weight, checkpoint["intro.weight"])


def test_checkpoint_for_the_other_backbone_is_refused():
    with pytest.raises(WeightLoadError, match="other backbone"):
        load_weights(tiny("kbnet_s_tiny"), tiny("kbnet_l_tiny").state_dict())


def test_create_model_errors_name_the_problem():
    with pytest.raises(KeyError, match="kbnet_s_sidd") as unknown:
        create_model("kbnet_x")
    with pytest.raises(TypeError, match="wdith") as bad_argument:
        create_model("kbnet_s_tiny", wdith=8)
    # user errors, so the command-line tools print one line instead of a traceback; not quoted like a KeyError
    assert isinstance(unknown.value, UserError) and isinstance(bad_argument.value, UserError)
    assert str(unknown.value).startswith("unknown model 'kbnet_x'; available: ")
    assert {"kbnet_s", "kbnet_s_gray", "kbnet_s_sidd", "kbnet_l", "kbnet_s_tiny", "kbnet_l_tiny"} <= set(list_models())


@pytest.mark.parametrize("build, channels", [(lambda: KBNetL(dim=16), "32 channels"),
                                             (lambda: KBNetS(width=48), "48 channels")])
def test_widths_the_fusion_conv_cannot_group_are_refused_clearly(build, channels):
    with pytest.raises(ValueError, match=f"{channels} do not split into the .* groups of the official grouped conv2"):
        build()


def test_official_constants_are_exposed():
    model = KBNetS(width=16, enc_blk_nums=(1,), dec_blk_nums=(1,), middle_blk_num=1, nset=8, kernel_size=5,
                   group_channels=2)
    block = model.encoders[0][0]
    assert block.w.shape == (1, 8, 16 * 2 * 25)
    assert block.kba.groups == 8
    assert model(torch.rand(1, 3, 9, 9)).shape == (1, 3, 9, 9)


@pytest.mark.parametrize("name, params_m, conv_g, full_g", [
    ("kbnet_s_sidd", 128.40, 57.81, 106.42),
    ("kbnet_l", 29.57, 107.69, 210.20),
])
def test_counts_match_the_paper(name, params_m, conv_g, full_g):
    """The published parameter and MAC counts at 256²: convolutions only (the paper's convention) and with the
    KBA and attention matrix products."""
    with torch.device("meta"):
        model = create_model(name)
    assert round(count_parameters(model) / 1e6, 2) == params_m
    assert round(count_macs(model, (3, 256, 256)) / 1e9, 2) == conv_g
    assert round(count_macs(model, (3, 256, 256), include_matmul=True) / 1e9, 2) == full_g


def test_summary_command_prints_a_table(capsys):
    summary_main(["kbnet_s_tiny", "--size", "64"])
    out = capsys.readouterr().out
    assert "| kbnet_s_tiny | 0.70 |" in out
