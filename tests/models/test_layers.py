"""The backbones' fast paths: channels-last execution, the fused LayerNorm and token attention, and the choice of
the KBA implementation per network or per call site, all equal to the plain formulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kbnet.models import create_model, layers
from kbnet.models.kbnet_l import TransAttention
from kbnet.models.layers import (
    GlobalAvgPool2d,
    GroupedConv2d,
    KernelBasisAttention,
    LayerNorm2d,
    block_diagonal,
    depthwise_then_sum,
    is_channels_last,
)
from kbnet.ops import native, use_kba
from tests.helpers.reference import relative_error

TINY = ("kbnet_s_tiny", "kbnet_l_tiny")


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name).double().eval()


def test_layer_norm_channels_last_equals_the_plain_formula():
    torch.manual_seed(0)
    norm = LayerNorm2d(6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(2, 6, 5, 7, dtype=torch.float64) * 3 + 1).requires_grad_()
    x_last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    y, y_last = norm(x), norm(x_last)
    assert is_channels_last(y_last) and not is_channels_last(y)
    assert relative_error(y_last, y) < 1e-13
    grad = torch.randn_like(y)
    y.backward(grad)
    weight_grad = norm.weight.grad.clone()
    norm.weight.grad = None
    y_last.backward(grad)
    assert relative_error(x_last.grad, x.grad) < 1e-12
    assert relative_error(norm.weight.grad, weight_grad) < 1e-12


def affine_norm(channels: int) -> LayerNorm2d:
    torch.manual_seed(0)
    norm = LayerNorm2d(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


def test_layer_norm_inference_under_autocast_normalises_the_bf16_map_directly():
    """Without autograd the bf16 map is normalised as it is (float32 statistics inside the kernel, float32 affine
    parameters): the float32 norm rounded to bf16, channels-last, with no float32 copy of the map."""
    norm = affine_norm(16)
    x = (torch.randn(2, 16, 6, 7) * 3 + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    expected = norm(x.float())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.profiler.profile() as prof:
        y = norm(x)
    assert y.dtype == torch.bfloat16 and is_channels_last(y)
    assert (y.float() - expected).abs().max() <= expected.abs().max() * 2**-8
    assert not [e.name for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_")]


def test_layer_norm_training_under_autocast_keeps_float32_gradients():
    """With autograd the gradients are those of a float32 norm of the same bf16 input (PyTorch's mixed-dtype
    backward sums the affine gradients in low precision, 5 % off over a 64² map): the native kernels compute in
    float32 on the bf16 values, PyTorch's path (without them) normalises a float32 copy."""
    norm, reference = affine_norm(16), affine_norm(16)
    x = torch.randn(1, 16, 64, 64).bfloat16().contiguous(memory_format=torch.channels_last)
    grad = torch.randn(1, 16, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    y.float().backward(grad)
    reference(x.float()).backward(grad)
    assert relative_error(norm.weight.grad, reference.weight.grad) < 1e-2
    assert relative_error(norm.bias.grad, reference.bias.grad) < 1e-2


@pytest.mark.parametrize("channels_last", [False, True])
def test_global_average_pool_equals_adaptive_pooling(channels_last):
    x = torch.randn(2, 12, 9, 7, dtype=torch.float64, requires_grad=True)
    x_in = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y, expected = GlobalAvgPool2d()(x_in), torch.nn.functional.adaptive_avg_pool2d(x, 1)
    assert y.shape == (2, 12, 1, 1) and relative_error(y, expected) < 1e-14
    grad = torch.randn_like(y)
    (x_grad,) = torch.autograd.grad(y, x, grad)
    assert relative_error(x_grad, grad.expand_as(x) / 63) < 1e-14


def test_global_average_pool_of_a_bf16_map_sums_in_float32():
    """A bf16 sum over 64² pixels near 100 would lose every digit; the float32 accumulation keeps bf16 precision."""
    x = (torch.rand(1, 8, 64, 64, dtype=torch.float64) + 100).bfloat16().contiguous(memory_format=torch.channels_last)
    y = GlobalAvgPool2d()(x)
    assert y.dtype == torch.bfloat16
    assert relative_error(y.double(), x.double().mean((2, 3), keepdim=True)) < 2**-8


@pytest.mark.parametrize("in_channels, out_channels, groups, merge", [
    (16, 16, 4, 4),  # KBNet_s's 5×5 spatial convolution: 4 in, 4 out per group
    (16, 8, 8, 8),  # the fusion-coefficient convolutions: 2 in, 1 out per group
    (24, 12, 6, 2),  # 4 in, 2 out per group, merged in pairs
])
def test_block_diagonal_weight_gives_the_grouped_convolution_and_its_gradients(in_channels, out_channels, groups,
                                                                                merge):
    torch.manual_seed(0)
    x = torch.randn(2, in_channels, 7, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out_channels, in_channels // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, out_channels, 7, 9, dtype=torch.float64)
    expected = F.conv2d(x, w, padding=1, groups=groups)
    expected_grads = torch.autograd.grad(expected, (x, w), grad)
    merged = F.conv2d(x, block_diagonal(w, groups, merge), padding=1, groups=groups // merge)
    assert relative_error(merged, expected) < 1e-12
    for got, want in zip(torch.autograd.grad(merged, (x, w), grad), expected_grads, strict=True):
        assert relative_error(got, want) < 1e-12


@pytest.mark.parametrize("case", ["float32", "bf16 input", "bf16 autocast"])
def test_grouped_conv_merges_groups_only_in_bf16_on_the_cpu(monkeypatch, case):
    """In bf16 the merged convolution runs (oneDNN pads each group to 16 channels) and gives the plain grouped
    convolution's result within bf16 rounding; float32 runs the plain convolution unchanged."""
    torch.manual_seed(0)
    conv = GroupedConv2d(32, 32, 5, padding=2, groups=8)
    x = torch.randn(1, 32, 12, 12).contiguous(memory_format=torch.channels_last)
    merges = []
    monkeypatch.setattr(layers, "block_diagonal", lambda w, g, m: merges.append(m) or block_diagonal(w, g, m))
    with torch.no_grad():
        expected = F.conv2d(x, conv.weight, conv.bias, padding=2, groups=8)
        if case == "float32":
            assert torch.equal(conv(x), expected) and not merges
            return
        if case == "bf16 input":
            out = conv.to(torch.bfloat16)(x.bfloat16())
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = conv(x)
    assert merges == [4] and out.dtype == torch.bfloat16
    assert relative_error(out.float(), expected) < 2**-7


@pytest.mark.parametrize("per_group", [2, 4, 16])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "contiguous"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_depthwise_then_sum_gives_the_grouped_convolution_and_its_gradients(per_group, channels_last, bias):
    """One output channel per group (the fusion-coefficient convolutions: 2 to 32 inputs per group)."""
    torch.manual_seed(0)
    groups = 3
    x = torch.randn(2, groups * per_group, 7, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(groups, per_group, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(groups, dtype=torch.float64, requires_grad=True) if bias else None
    leaves = (x, w) if b is None else (x, w, b)
    grad = torch.randn(2, groups, 7, 9, dtype=torch.float64)
    expected = F.conv2d(x, w, b, padding=1, groups=groups)
    got = depthwise_then_sum(x, w, b, (1, 1), (1, 1), (1, 1))
    assert relative_error(got, expected) < 1e-12
    assert is_channels_last(got) == channels_last
    for got_grad, want in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(expected, leaves, grad),
                              strict=True):
        assert relative_error(got_grad, want) < 1e-12


@pytest.mark.parametrize("out_channels, groups, dtype, depthwise", [
    (8, 8, torch.float32, True),  # fusion coefficients, float32: depthwise then sum
    (8, 8, torch.float64, True),
    (8, 8, torch.bfloat16, False),  # bf16: the merged groups instead
    (32, 8, torch.float32, False),  # 4 outputs per group (KBNet_s's 5×5 convolution): plain
])
def test_grouped_conv_runs_one_output_per_group_as_depthwise_on_the_cpu(monkeypatch, out_channels, groups, dtype,
                                                                       depthwise):
    torch.manual_seed(0)
    conv = GroupedConv2d(32, out_channels, 3, padding=1, groups=groups).to(dtype)
    x = torch.randn(1, 32, 12, 12, dtype=dtype).contiguous(memory_format=torch.channels_last)
    calls = []
    monkeypatch.setattr(layers, "depthwise_then_sum", lambda *a: calls.append(1) or depthwise_then_sum(*a))
    with torch.no_grad():
        out = conv(x)
        expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1, groups=groups)
    assert bool(calls) == depthwise
    assert relative_error(out.double(), expected) < (2**-7 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("heads", [1, 2])
def test_token_attention_equals_the_plain_formula(heads):
    torch.manual_seed(0)
    attention = TransAttention(8, heads).double()
    with torch.no_grad():
        attention.temperature.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64, requires_grad=True)
    x_last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    y, y_last = attention(x), attention(x_last)
    assert is_channels_last(y_last)
    assert relative_error(y_last, y) < 1e-12
    grad = torch.randn_like(y)
    y.backward(grad)
    y_last.backward(grad)
    assert relative_error(x_last.grad, x.grad) < 1e-12


@pytest.mark.parametrize("bias", [False, True])
def test_inference_projects_q_k_v_one_by_one_with_the_same_result(bias):
    torch.manual_seed(0)
    attention = TransAttention(8, 2, bias=bias).double()
    x = torch.randn(1, 8, 5, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused = attention.qkv_dwconv(attention.qkv(x)).chunk(3, dim=1)
        for one, reference in zip(attention._project_one_by_one(x), fused, strict=True):
            assert relative_error(one, reference) < 1e-14
        lean = attention(x)
    assert relative_error(lean, attention(x)) < 1e-13  # with autograd: the fused projection


def test_token_attention_clamps_zero_norms_like_normalize():
    attention = TransAttention(4, 1).double()
    x = torch.zeros(1, 4, 3, 3, dtype=torch.float64)
    plain = attention(x)
    fast = attention(x.contiguous(memory_format=torch.channels_last))
    assert torch.isfinite(fast).all()
    assert torch.allclose(fast, plain)


@pytest.mark.parametrize("name", TINY)
def test_backbones_run_channels_last_and_return_contiguous(name):
    model = tiny(name)
    layouts = []

    def record(module, inputs, output):
        x = inputs[0]
        layouts.append((type(module).__name__, is_channels_last(x) or x.shape[-2:] == (1, 1)))  # pooled maps

    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, KernelBasisAttention, LayerNorm2d)):
            module.register_forward_hook(record)
    x = torch.rand(1, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
        y_last = model(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous() and torch.equal(y, y_last)
    assert layouts and all(last for _, last in layouts), [n for n, last in layouts if not last]


@pytest.mark.parametrize("name", TINY)
def test_every_kba_implementation_gives_the_same_network(name):
    model = tiny(name)
    x = torch.rand(2, 3, 24, 24, dtype=torch.float64)
    outputs = {}
    grads = {}
    impls = ["torch", "reference"] + (["native"] if native.available() else [])
    for impl in impls:
        model.zero_grad()
        with use_kba(impl):
            out = model(x)
        out.square().mean().backward()
        outputs[impl] = out.detach()
        grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters()])
    for impl in impls[1:]:
        assert relative_error(outputs[impl], outputs["torch"]) < 1e-10, impl
        assert relative_error(grads[impl], grads["torch"]) < 1e-10, impl


def test_a_call_site_can_pin_its_implementation(monkeypatch):
    import kbnet.ops.kernel_basis as kba_module

    calls = []
    real = kba_module.kba_reference
    monkeypatch.setattr(kba_module, "kba_reference", lambda *a: calls.append(a[0].shape[1]) or real(*a))
    model = tiny("kbnet_s_tiny")
    sites = [m for m in model.modules() if isinstance(m, KernelBasisAttention)]
    sites[0].impl = "reference"
    assert "impl='reference'" in repr(sites[0])
    with torch.no_grad():
        model(torch.rand(1, 3, 16, 16, dtype=torch.float64))
    assert calls == [sites[0].groups * 4]  # only the pinned site; 4 channels per group in KBNet_s
    with torch.no_grad(), use_kba("reference"):
        model(torch.rand(1, 3, 16, 16, dtype=torch.float64))
    assert len(calls) == 1 + len(sites)
