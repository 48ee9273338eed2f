"""The KBA operator: official reference cases, gradients, double backward, bf16 autocast, memory behaviour."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import kbnet.ops.kernel_basis as kba_module
from kbnet.ops import kba, kba_reference
from tests.reference import load_reference, relative_error

OPS = {"kba": kba, "kba_reference": kba_reference}


def random_case(b=2, c=8, h=5, w=6, nset=3, k=3, groups=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gc = c // groups
    tensors = [torch.randn(b, c, h, w, generator=gen, dtype=dtype),
               torch.randn(b, nset, h, w, generator=gen, dtype=dtype),
               torch.randn(1, nset, c * gc * k * k, generator=gen, dtype=dtype),
               torch.randn(1, nset, c, generator=gen, dtype=dtype)]
    return [t.requires_grad_() for t in tensors], k, groups


@pytest.fixture(params=[1, 10**9], ids=["one-row-slabs", "one-slab"])
def slab_budget(request, monkeypatch):
    """Run each test with the slab loop at both extremes, so row seams are exercised."""
    monkeypatch.setattr(kba_module, "SLAB_BYTES", request.param)


@pytest.mark.parametrize("op", OPS)
def test_matches_official_reference_cases(op, slab_budget):
    for case in load_reference("kba_op.pt"):
        inputs = [case[k].clone().requires_grad_() for k in ("x", "att", "w", "b")]
        out = OPS[op](*inputs, case["k"], case["groups"])
        out.backward(case["grad_out"])
        assert relative_error(out, case["out"]) < 1e-6
        for tensor, key in zip(inputs, ("grad_x", "grad_att", "grad_w", "grad_b"), strict=True):
            assert relative_error(tensor.grad, case[key]) < 1e-6, key


@pytest.mark.parametrize("shape", [dict(), dict(b=1, c=4, h=3, w=7, nset=2, groups=1),
                                   dict(b=1, c=6, h=4, w=4, nset=2, k=5, groups=3)])
def test_gradcheck(shape, slab_budget):
    inputs, k, groups = random_case(**shape)
    assert gradcheck(lambda *t: kba(*t, k, groups), inputs)


def test_double_backward():
    inputs, k, groups = random_case(b=1, c=4, h=4, w=3, nset=2)
    assert gradgradcheck(lambda *t: kba(*t, k, groups), inputs)


def test_equals_reference_formulation_on_random_inputs(slab_budget):
    inputs, k, groups = random_case(b=2, c=16, h=9, w=11, nset=32, groups=4, seed=3)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    grad = torch.randn(2, 16, 9, 11, dtype=torch.float64)
    out = kba(*inputs, k, groups)
    ref = kba_reference(*ref_inputs, k, groups)
    out.backward(grad)
    ref.backward(grad)
    assert relative_error(out, ref) < 1e-12
    for a, b in zip(inputs, ref_inputs, strict=True):
        assert relative_error(a.grad, b.grad) < 1e-12


def test_bf16_autocast_forward_backward():
    inputs, k, groups = random_case(b=1, c=16, h=12, w=12, nset=32, groups=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kba(*inputs, k, groups)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    for t in inputs:
        assert t.grad.dtype == torch.float32
        assert torch.isfinite(t.grad).all()
    reference = kba_reference(*[t.detach() for t in inputs], k, groups)
    assert relative_error(out.float(), reference) < 5e-2


def test_keeps_only_its_inputs_for_backward():
    """No per-pixel fused kernel (B·HW·C·gc·k² values) or unfolded input may stay alive until backward."""
    inputs, k, groups = random_case(b=1, c=16, h=16, w=16, nset=32, groups=4, dtype=torch.float32)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kba(*inputs, k, groups)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    assert sum(t.numel() * t.element_size() for t in saved) <= input_bytes


@pytest.mark.parametrize("bad, message", [
    (dict(att=torch.zeros(1, 3, 4, 4)), "does not match"),
    (dict(weight=torch.zeros(1, 3, 10)), "weight has shape"),
    (dict(bias=torch.zeros(1, 3, 5)), "bias has shape"),
    (dict(groups=3), "not divisible"),
    (dict(kernel_size=2), "odd"),
])
def test_bad_shapes_are_named(bad, message):
    args = dict(x=torch.zeros(2, 8, 4, 4), att=torch.zeros(2, 3, 4, 4), weight=torch.zeros(1, 3, 8 * 4 * 9),
                bias=torch.zeros(1, 3, 8), kernel_size=3, groups=2)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        kba(**args)
