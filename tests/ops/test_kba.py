"""The KBA operator: official reference cases, every implementation against the official formulation, gradients,
double backward, bf16 autocast, memory behaviour and the choice of the implementation."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import kbnet.ops.kernel_basis as kba_module
from kbnet.ops import IMPLEMENTATIONS, default_impl, kba, kba_reference, native, use_kba
from tests.helpers.kba import random_case, require_native
from tests.helpers.reference import load_reference, relative_error

OPS = {"kba": kba, "kba_reference": kba_reference}


def applicable(impl: str, x: torch.Tensor, groups: int) -> str:
    """``impl``, or ``auto`` (the PyTorch slabs) where the native kernels have no blocking for the group size."""
    return "auto" if impl == "native" and not native.supports(x, groups) else impl


pytestmark = pytest.mark.usefixtures("single_thread")
"""Tiny tensors gain nothing from threads, and on a busy machine every parallel region waits for its slowest
thread: gradchecks run several times faster on one."""


@pytest.fixture(params=[1, 10**9], ids=["one-row-slabs", "one-slab"])
def slab_budget(request, monkeypatch):
    """Run each test with the slab loop at both extremes, so row seams are exercised."""
    monkeypatch.setattr(kba_module, "SLAB_BYTES", request.param)


@pytest.fixture(params=["native", "native-split", "torch-one-row-slabs", "torch-one-slab"])
def impl(request, monkeypatch) -> str:
    """Every implementation path: native as used, native with its work split into many tasks, chunks and threads
    (tiny task sizes), and the PyTorch slabs at both extremes of the slab budget."""
    if request.param.startswith("native"):
        require_native()
        if request.param == "native-split":
            monkeypatch.setattr(native, "POSITIONS_PER_TASK", 16)
            monkeypatch.setattr(native, "MACS_PER_THREAD", 1)
            torch.set_num_threads(2)  # restored by single_thread
        return "native"
    monkeypatch.setattr(kba_module, "SLAB_BYTES", 1 if "row" in request.param else 10**9)
    return "torch"


@pytest.mark.parametrize("op", OPS)
def test_matches_official_reference_cases(op, slab_budget):
    for case in load_reference("kba_op.pt"):
        inputs = [case[k].clone().requires_grad_() for k in ("x", "att", "w", "b")]
        out = OPS[op](*inputs, case["k"], case["groups"])
        out.backward(case["grad_out"])
        assert relative_error(out, case["out"]) < 1e-6
        for tensor, key in zip(inputs, ("grad_x", "grad_att", "grad_w", "grad_b"), strict=True):
            assert relative_error(tensor.grad, case[key]) < 1e-6, key


def test_every_implementation_matches_official_reference_cases(impl):
    for case in load_reference("kba_op.pt"):
        inputs = [case[k].clone().requires_grad_() for k in ("x", "att", "w", "b")]
        out = kba(*inputs, case["k"], case["groups"], impl=applicable(impl, inputs[0], case["groups"]))
        out.backward(case["grad_out"])
        assert relative_error(out, case["out"]) < 1e-6
        for tensor, key in zip(inputs, ("grad_x", "grad_att", "grad_w", "grad_b"), strict=True):
            assert relative_error(tensor.grad, case[key]) < 1e-6, key


@pytest.mark.parametrize("shape", [dict(), dict(b=1, c=4, h=3, w=7, nset=2, groups=1),
                                   dict(b=1, c=6, h=4, w=4, nset=2, k=5, groups=3)])
def test_gradcheck(shape, slab_budget):
    inputs, k, groups = random_case(**shape)
    assert gradcheck(lambda *t: kba(*t, k, groups), inputs)


@pytest.mark.parametrize("shape", [dict(), dict(b=1, c=4, h=3, w=17, nset=2, groups=1),
                                   dict(b=1, c=4, h=3, w=4, nset=3, k=5, groups=2)])
def test_gradcheck_every_implementation(shape, impl):
    """Fast mode (random projections of the Jacobians): the per-element check of every path would take minutes."""
    inputs, k, groups = random_case(**shape)
    assert gradcheck(lambda *t: kba(*t, k, groups, impl=impl), inputs, fast_mode=True)


def test_double_backward():
    inputs, k, groups = random_case(b=1, c=4, h=4, w=3, nset=2)
    assert gradgradcheck(lambda *t: kba(*t, k, groups), inputs)


@pytest.mark.parametrize("impl_name", ["native", "torch"])
def test_double_backward_every_implementation(impl_name):
    """The native backward is not differentiable itself: with ``create_graph`` it records the slab backward."""
    if impl_name == "native":
        require_native()
    inputs, k, groups = random_case(b=1, c=4, h=4, w=3, nset=2)
    assert gradgradcheck(lambda *t: kba(*t, k, groups, impl=impl_name), inputs)


def test_reference_formulation_refuses_double_backward_clearly():
    """Like the official function, the yardstick's backward is not differentiable; torch says so."""
    inputs, k, groups = random_case(b=1, c=4, h=4, w=3, nset=2)
    out = kba(*inputs, k, groups, impl="reference")
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grads[0].sum().backward()


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


@pytest.mark.parametrize("shape", [
    dict(b=2, c=16, h=9, w=6, nset=32, groups=4),  # KBNet_s groups, narrow: unfolded columns
    dict(b=2, c=16, h=7, w=37, nset=32, groups=8),  # KBNet_l groups, wide: padded rows, several chunks
    dict(b=1, c=8, h=13, w=5, nset=5, k=5, groups=8),  # one channel per group, k=5, odd nset
    dict(b=3, c=8, h=6, w=20, nset=3, groups=1),  # one group of eight channels
    dict(b=1, c=9, h=5, w=18, nset=4, groups=3),  # three channels per group: no native blocking (PyTorch path)
    dict(b=1, c=8, h=1, w=1, nset=2, groups=2),  # a single pixel
    dict(b=2, c=10, h=5, w=21, nset=3, groups=5),  # five groups of two: a grad_x_w task of four groups, one of one
], ids=["gc4-columns", "gc2-rows", "gc1-k5", "gc8", "gc3", "1x1", "gc2-uneven-tasks"])
def test_every_implementation_equals_reference_formulation(shape, impl):
    inputs, k, groups = random_case(seed=5, **shape)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = kba(*inputs, k, groups, impl=applicable(impl, inputs[0], groups))
    ref = kba_reference(*ref_inputs, k, groups)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert relative_error(out, ref) < 1e-12
    for a, b in zip(inputs, ref_inputs, strict=True):
        assert relative_error(a.grad, b.grad) < 1e-12


def test_native_float32_matches_float64():
    require_native()
    inputs, k, groups = random_case(b=2, c=16, h=10, w=20, nset=32, groups=4, dtype=torch.float32, seed=2)
    out = kba(*inputs, k, groups, impl="native")
    ref = kba_reference(*[t.detach().double() for t in inputs], k, groups)
    assert out.dtype == torch.float32
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["float64", "float32"])
@pytest.mark.parametrize("impl_name", ["native", "torch", "reference"])
def test_channels_last_inputs_give_the_same_result_in_the_same_layout(impl_name, dtype, tol):
    if impl_name == "native":
        require_native()
    inputs, k, groups = random_case(b=2, c=16, h=6, w=19, nset=4, groups=4, seed=4, dtype=dtype)
    last = [t.detach().contiguous(memory_format=torch.channels_last).requires_grad_() if t.dim() == 4
            else t.detach().clone().requires_grad_() for t in inputs]
    out = kba(*inputs, k, groups, impl=impl_name)
    out_last = kba(*last, k, groups, impl=impl_name)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_last.backward(grad.contiguous(memory_format=torch.channels_last))
    assert relative_error(out_last, out) < tol
    for a, b in zip(inputs, last, strict=True):
        assert relative_error(b.grad, a.grad) < tol
    if impl_name == "native":
        assert out_last.is_contiguous(memory_format=torch.channels_last)
        assert last[0].grad.is_contiguous(memory_format=torch.channels_last)


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


@pytest.mark.parametrize("impl_name", ["native", "torch", "reference"])
def test_bf16_autocast_every_implementation(impl_name):
    """Autocast gives the autocast dtype and float32 gradients (the native kernels compute in bf16 with float32 sums
    where the CPU has AVX512_BF16, else in float32)."""
    if impl_name == "native":
        require_native()
    inputs, k, groups = random_case(b=1, c=16, h=12, w=12, nset=32, groups=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kba(*inputs, k, groups, impl=impl_name)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in inputs)
    reference = kba_reference(*[t.detach() for t in inputs], k, groups)
    assert relative_error(out.float(), reference) < (1e-2 if impl_name == "native" else 5e-2)


def test_bfloat16_tensors_outside_autocast_use_native_only_with_bf16_kernels():
    inputs, k, groups = random_case(b=1, c=8, h=6, w=6, nset=4, groups=2, dtype=torch.bfloat16)
    out = kba(*inputs, k, groups)
    assert out.dtype == torch.bfloat16
    if torch.bfloat16 in native.native_dtypes():
        assert kba(*inputs, k, groups, impl="native").dtype == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="native implementation needs"):
            kba(*inputs, k, groups, impl="native")


def test_keeps_only_its_inputs_for_backward():
    """No per-pixel fused kernel (B·HW·C·gc·k² values) or unfolded input may stay alive until backward."""
    inputs, k, groups = random_case(b=1, c=16, h=16, w=16, nset=32, groups=4, dtype=torch.float32)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kba(*inputs, k, groups)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    assert sum(t.numel() * t.element_size() for t in saved) <= input_bytes


@pytest.mark.parametrize("impl_name", ["native", "torch", "reference"])
def test_every_implementation_keeps_only_its_inputs(impl_name):
    if impl_name == "native":
        require_native()
    inputs, k, groups = random_case(b=1, c=16, h=16, w=16, nset=32, groups=4, dtype=torch.float32)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kba(*inputs, k, groups, impl=impl_name)
    assert sum(t.numel() * t.element_size() for t in saved) <= sum(t.numel() * t.element_size() for t in inputs)


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


def test_use_kba_selects_the_implementation(monkeypatch):
    calls = []
    monkeypatch.setattr(kba_module, "kba_reference", lambda *a: calls.append("reference") or a[0])
    inputs, k, groups = random_case()
    assert default_impl() == "auto"
    with use_kba("reference"):
        assert default_impl() == "reference"
        kba(*inputs, k, groups)
        with use_kba("torch"):
            kba(*inputs, k, groups)
        kba(*inputs, k, groups, impl="torch")
    assert default_impl() == "auto"
    assert calls == ["reference"]


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("KBNET_KBA", "torch")
    assert default_impl() == "torch"
    with use_kba("reference"):
        assert default_impl() == "reference"
    monkeypatch.setenv("KBNET_KBA", "fastest")
    with pytest.raises(ValueError, match="KBNET_KBA.*'fastest'"):
        default_impl()


def test_unknown_implementation_is_named():
    inputs, k, groups = random_case()
    with pytest.raises(ValueError, match="'cuda'.*expected one of"):
        kba(*inputs, k, groups, impl="cuda")
    with pytest.raises(ValueError, match="use_kba"), use_kba("fast"):
        pass
    assert set(IMPLEMENTATIONS) == {"auto", "native", "torch", "triton", "reference", "decomposed"}
