"""The Triton KBA kernels, run by Triton's interpreter on CPU tensors: the official reference cases, odd shapes,
half precision, autocast, double backward, determinism, and tiny backbones equal to the native kernels.

``TRITON_INTERPRET=1`` must be set before triton is imported and changes all of triton for the process, so
``tests/test_kba_triton.py`` runs this module in a subprocess of its own with the variable set.
"""

from __future__ import annotations

import pytest
import torch

from kbnet.models import create_model
from kbnet.ops import kba, kba_reference, kba_triton, use_kba
from tests.helpers.kba import random_case, require_native
from tests.helpers.reference import load_reference, relative_error

if not kba_triton.interpreting():
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported: run through tests/test_kba_triton.py",
                allow_module_level=True)

KEYS = ("x", "att", "w", "b")
GRADS = ("grad_x", "grad_att", "grad_w", "grad_b")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """The interpreter for this test only: the kernels are compiled per mode, so nothing leaks into other tests."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["float32", "bfloat16"])
def test_official_reference_cases(dtype, tol):
    for case in load_reference("kba_op.pt"):
        inputs = [case[key].to(dtype).requires_grad_() for key in KEYS]
        out = kba(*inputs, case["k"], case["groups"], impl="triton")
        out.backward(case["grad_out"].to(dtype))
        assert out.dtype == dtype
        assert relative_error(out, case["out"]) < tol
        for tensor, key in zip(inputs, GRADS, strict=True):
            assert tensor.grad.dtype == dtype
            assert relative_error(tensor.grad, case[key]) < tol, key


FP32, FP16 = (torch.float32, 1e-5), (torch.float16, 2e-2)


@pytest.mark.parametrize("shape, dtype, tol", [
    (dict(b=1, c=8, h=7, w=13, nset=5, groups=4), *FP32),  # 2 channels per group, odd nset, several tiles
    (dict(b=1, c=8, h=7, w=13, nset=5, groups=4), *FP16),
    (dict(b=2, c=12, h=5, w=9, nset=32, groups=3), *FP32),  # 4 channels per group, KBNet's nset
    (dict(b=1, c=6, h=3, w=31, nset=17, groups=6), *FP32),  # 1 channel per group, a wide strip, nset above 16
    (dict(b=1, c=3, h=1, w=1, nset=2, groups=1), *FP32),  # a single pixel, 3 channels in one group
], ids=["gc2", "gc2-float16", "gc4", "gc1-strip", "1x1-gc3"])
def test_odd_shapes_equal_the_official_formulation(shape, dtype, tol):
    inputs, k, groups = random_case(seed=7, dtype=dtype, **shape)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    out = kba(*inputs, k, groups, impl="triton")
    ref = kba_reference(*exact, k, groups)
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    assert relative_error(out, ref) < tol
    for a, b in zip(inputs, exact, strict=True):
        assert relative_error(a.grad, b.grad) < tol


def test_bf16_autocast_gives_the_autocast_dtype_and_float32_gradients():
    inputs, k, groups = random_case(b=1, c=16, h=6, w=7, nset=32, groups=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kba(*inputs, k, groups, impl="triton")
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in inputs)
    assert relative_error(out, kba_reference(*[t.detach() for t in inputs], k, groups)) < 2e-2


def test_backward_is_deterministic():
    inputs, k, groups = random_case(b=2, c=8, h=9, w=10, nset=6, groups=2, dtype=torch.float32)
    grads = []
    for _ in range(2):
        out = kba(*inputs, k, groups, impl="triton")
        grads.append(torch.autograd.grad(out, inputs, torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_double_backward_goes_through_the_differentiable_pytorch_backward():
    inputs, k, groups = random_case(b=1, c=8, h=4, w=5, nset=3, groups=2, dtype=torch.float32)
    second = {}
    for impl in ("triton", "torch"):
        out = kba(*inputs, k, groups, impl=impl)
        first = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
        second[impl] = torch.autograd.grad(sum(g.square().sum() for g in first), inputs)
    for a, b in zip(second["triton"], second["torch"], strict=True):
        assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("name", ["kbnet_s_tiny", pytest.param("kbnet_l_tiny", marks=pytest.mark.slow)])
def test_tiny_backbones_equal_the_native_path(name):
    """Forward and backward of a whole network (8², the smallest size both accept). KBNet_l's many small groups
    make it a minute of interpreted programs, hence slow."""
    require_native()
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.rand(1, 3, 8, 8)
    results = {}
    for impl in ("native", "triton"):
        model.zero_grad()
        with use_kba(impl):
            out = model(x)
        out.square().sum().backward()
        results[impl] = (out.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert relative_error(results["triton"][0], results["native"][0]) < 1e-5
    assert relative_error(results["triton"][1], results["native"][1]) < 1e-5  # all parameter gradients


def test_unsupported_shapes_are_refused_with_the_reason():
    inputs, k, groups = random_case(b=1, c=8, h=4, w=4, nset=3, groups=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="8 channels per group with kernel size 3 need 1024 register columns"):
        kba(*inputs, k, groups, impl="triton")
    inputs, k, groups = random_case(b=1, c=8, h=4, w=4, nset=3, groups=2)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16; got torch.float64"):
        kba(*inputs, k, groups, impl="triton")
