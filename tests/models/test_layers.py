"""The backbones' fast paths: channels-last execution, the fused LayerNorm and token attention, and the choice of
the KBA implementation per network or per call site, all equal to the plain formulation."""

from __future__ import annotations

import pytest
import torch

from kbnet.models import create_model
from kbnet.models.kbnet_l import TransAttention
from kbnet.models.layers import KernelBasisAttention, LayerNorm2d, is_channels_last
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
