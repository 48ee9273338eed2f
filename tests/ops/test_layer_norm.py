"""The native channel LayerNorm: float32 and bf16 against a float64 reference, its dispatch, its gradient of the
gradient, torch.compile without graph breaks and torch.export without kbnet operators."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from kbnet.models.layers import LayerNorm2d
from kbnet.ops import layer_norm, native
from kbnet.ops.layer_norm import channel_layer_norm
from tests.helpers.kba import require_native
from tests.helpers.reference import relative_error
from tests.helpers.threads import torch_threads

EPS = 1e-6


def case(c: int, dtype: torch.dtype, b: int = 2, h: int = 9, w: int = 13, seed: int = 0):
    """A channels-last map (offset and scaled: the two-pass variance matters), parameters and an output gradient."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, c, h, w, generator=gen) * 3 + 2).to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    grad = torch.randn(b, c, h, w, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    return x, weight, bias, grad


def reference(x, weight, bias, grad):
    """The official formula in float64 on the values the kernels get, with its gradients."""
    x64 = x.detach().double().requires_grad_()
    w64, b64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    mu = x64.mean(1, keepdim=True)
    y = (x64 - mu) / torch.sqrt((x64 - mu).pow(2).mean(1, keepdim=True) + EPS) * w64.view(1, -1, 1, 1) \
        + b64.view(1, -1, 1, 1)
    return (y.detach(), *torch.autograd.grad(y, (x64, w64, b64), grad.double()))


def native_result(x, weight, bias, grad):
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    y = channel_layer_norm(x, weight, bias, EPS, native_kernels=True)
    return (y, *torch.autograd.grad(y, (x, weight, bias), grad))


# 5 and 13: the scalar tail after the vectors; 48, 96: KBNet_l; 1024: KBNet_s's middle
@pytest.mark.parametrize("channels", [1, 5, 13, 16, 48, 96, 1024])
def test_float32_forward_and_backward_equal_the_float64_formula(channels):
    require_native()
    inputs = case(channels, torch.float32)
    got, want = native_result(*inputs), reference(*inputs)
    # one channel: y = bias and grad_x = 0, up to rounding of terms as large as grad · weight / sqrt(eps)
    scale = inputs[3].abs().max() * inputs[1].max() / EPS**0.5
    for name, g, r in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, want, strict=True):
        assert g.dtype == torch.float32, name
        assert relative_error(g, r) < 2e-6 if r.norm() > 0 else g.abs().max() < 1e-6 * scale, name
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels", [5, 48, 1024])
def test_bf16_reads_and_writes_bf16_and_sums_the_parameter_gradients_in_float32(channels):
    """The map and its gradient are the float32 kernels' results on the same values rounded once to bf16 (what
    ``.to(torch.bfloat16)`` gives, up to one bf16 unit where the compiler fused a multiply-add differently); the
    weight and bias gradients are float32 sums (float32 accurate, where PyTorch's bf16 backward is 5 % off)."""
    require_native()
    inputs = case(channels, torch.bfloat16, h=32, w=32)
    y, grad_x, grad_weight, grad_bias = native_result(*inputs)
    x, weight, bias, grad = inputs
    y32, grad_x32, *_ = native_result(x.float(), weight, bias, grad.float())
    assert y.dtype == grad_x.dtype == torch.bfloat16
    assert grad_weight.dtype == grad_bias.dtype == torch.float32
    for got, want in ((y, y32), (grad_x, grad_x32)):
        rounded = want.detach().to(torch.bfloat16)
        unit = torch.ldexp(torch.ones_like(want), torch.frexp(want.detach()).exponent - 8)
        assert ((got.float() - rounded.float()).abs() <= unit).all()
        assert (got == rounded).float().mean() > 0.99
    y_ref, grad_x_ref, grad_weight_ref, grad_bias_ref = reference(*inputs)
    assert relative_error(y, y_ref) < 2**-8 and relative_error(grad_x, grad_x_ref) < 2**-8
    assert relative_error(grad_weight, grad_weight_ref) < 1e-5
    assert relative_error(grad_bias, grad_bias_ref) < 1e-5


def test_bf16_rounds_to_nearest_even_and_keeps_nan_and_infinity():
    """Weight 1 and bias 0 on rows whose statistics are exact: the outputs are float32 values the bf16 store rounds
    (ties to even); a NaN or infinity in a pixel makes that pixel NaN and leaves the others alone."""
    require_native()
    ones, zeros = torch.ones(2), torch.zeros(2)
    x = torch.tensor([[-1.0, float("nan")], [1.0, 1.0]]).view(1, 2, 1, 2)  # pixels (-1, 1) and (NaN, 1)
    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y = channel_layer_norm(x, ones, zeros, 0.0, native_kernels=True)
    assert y[0, :, 0, 0].tolist() == [-1.0, 1.0] and y[0, :, 0, 1].isnan().all()
    bias = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8])  # halfway between bf16 values: to the even neighbour
    x = torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y = channel_layer_norm(x, torch.zeros(2), bias, 0.0, native_kernels=True)
    assert y.flatten().tolist() == [1.0, 1.0 + 4 * 2**-8]
    x = torch.tensor([float("inf"), 1.0]).view(1, 2, 1, 1).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    assert channel_layer_norm(x, ones, zeros, EPS, native_kernels=True).isnan().all()


def test_results_do_not_depend_on_the_thread_count_beyond_rounding_and_repeat_exactly():
    require_native()
    inputs = case(48, torch.float32, h=64, w=64)
    with torch_threads(1):
        one = native_result(*inputs)
    with torch_threads(2):
        two, again = native_result(*inputs), native_result(*inputs)
    for a, b, c in zip(one, two, again, strict=True):
        assert relative_error(b, a) < 1e-6
        assert torch.equal(b, c)


def test_gradient_of_the_gradient_equals_plain_autograd():
    """The native backward is not differentiable; with ``create_graph`` the same gradients come from differentiable
    operations, so a second derivative (e.g. a gradient penalty) equals PyTorch's LayerNorm's."""
    require_native()
    x, weight, bias, grad = case(12, torch.float32, h=5, w=6)
    results = []
    for native_kernels in (True, False):
        xs, ws = x.detach().requires_grad_(), weight.detach().requires_grad_()
        y = channel_layer_norm(xs, ws, bias, EPS, native_kernels=native_kernels)
        (grad_x,) = torch.autograd.grad(y, xs, grad, create_graph=True)
        results.append(torch.autograd.grad(grad_x.square().sum(), (xs, ws)))
    for got, want in zip(*results, strict=True):
        assert relative_error(got, want) < 1e-5


def test_the_native_kernels_serve_channels_last_bf16_cpu_maps_and_float32_on_request(monkeypatch):
    require_native()
    x = torch.zeros(1, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    assert layer_norm.supports(x) and layer_norm.supports(x.bfloat16())
    assert not layer_norm.supports(x.double())  # float64 (the reference tests) stays on PyTorch
    assert not layer_norm.supports(x.contiguous())
    assert not layer_norm.supports(x.to(torch.float16))
    calls = []
    real = torch.ops.kbnet.channel_layer_norm

    def recorded(x, *args):
        calls.append(x.dtype)
        return real(x, *args)
    monkeypatch.setattr(torch.ops.kbnet, "channel_layer_norm", recorded)
    ones, zeros = torch.ones(8), torch.zeros(8)
    for t, params in ((x, (ones, zeros)), (x.bfloat16(), (ones, zeros)), (x.double(), (ones.double(), zeros.double()))):
        channel_layer_norm(t, *params, EPS)
    channel_layer_norm(x, ones, zeros, EPS, native_kernels=True)
    assert calls == [torch.bfloat16, torch.float32]


def test_what_the_kernels_cannot_read_is_refused_before_they_run():
    require_native()
    x, weight, bias, _ = case(8, torch.bfloat16)
    with pytest.raises(ValueError, match="channels-last CPU map.*strides"):
        channel_layer_norm(x.contiguous(), weight, bias, EPS, native_kernels=True)
    with pytest.raises(ValueError, match="channels-last CPU map.*float64"):
        torch.ops.kbnet.channel_layer_norm(x.double(), weight, bias, EPS)
    with pytest.raises(ValueError, match=r"float32 CPU weight of shape \(8,\); got cpu torch.float32 \(7,\)"):
        torch.ops.kbnet.channel_layer_norm(x, weight[:7], bias, EPS)
    with pytest.raises(ValueError, match="float32 CPU bias"):
        torch.ops.kbnet.channel_layer_norm(x, weight, bias.bfloat16(), EPS)


def test_without_the_native_kernels_bf16_layer_norm_runs_on_pytorch(monkeypatch):
    x, weight, bias, grad = case(16, torch.bfloat16)
    want = reference(x, weight, bias, grad)
    monkeypatch.setattr(native, "available", lambda: False)
    assert not layer_norm.supports(x)
    norm = LayerNorm2d(16)
    norm.load_state_dict({"weight": weight, "bias": bias})
    xs = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(xs)
    y.backward(grad)
    assert y.dtype == torch.bfloat16
    assert relative_error(y, want[0]) < 2**-8 and relative_error(xs.grad, want[1]) < 2**-8
    assert relative_error(norm.weight.grad, want[2]) < 1e-5


def test_layer_norm_2d_under_bf16_autocast_training_stays_bf16_with_float32_gradients():
    """The backbones' use: a bf16 map under autocast goes in and comes out bf16, with no float32 copy of it, and the
    parameters' gradients are those of the float64 formula on the same bf16 values."""
    require_native()
    x, weight, bias, grad = case(32, torch.bfloat16, h=64, w=64)
    norm = LayerNorm2d(32)
    norm.load_state_dict({"weight": weight, "bias": bias})
    xs = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
        y = norm(xs)
        y.backward(grad)
    assert y.dtype == xs.grad.dtype == torch.bfloat16
    assert not [e.name for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_")]
    want = reference(x, weight, bias, grad)
    assert relative_error(norm.weight.grad, want[2]) < 1e-5
    assert relative_error(norm.bias.grad, want[3]) < 1e-5


def test_compiles_without_a_graph_break_into_the_registered_operators():
    require_native()
    x, weight, bias, grad = case(16, torch.bfloat16)
    norm = LayerNorm2d(16)
    norm.load_state_dict({"weight": weight, "bias": bias})
    graphs: list[list[str]] = []

    def record(gm, example_inputs):
        graphs.append(sorted({str(n.target) for n in gm.graph.nodes if str(n.target).startswith("kbnet.")}))
        return make_boxed_func(gm)
    compiled = torch.compile(norm, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    xs = x.detach().requires_grad_()
    y = compiled(xs)
    y.backward(grad)
    assert graphs == [["kbnet.channel_layer_norm.default"], ["kbnet.channel_layer_norm_backward.default"]]
    want = native_result(x, weight, bias, grad)
    assert torch.equal(y, want[0]) and torch.equal(xs.grad, want[1])
    assert torch.equal(norm.weight.grad, want[2]) and torch.equal(norm.bias.grad, want[3])


def test_operators_pass_torch_library_opcheck():
    require_native()
    x, weight, bias, grad = case(8, torch.float32, b=1, h=3, w=4)
    torch.library.opcheck(torch.ops.kbnet.channel_layer_norm.default, (x.requires_grad_(), weight, bias, EPS))
    _, mean, rstd = torch.ops.kbnet.channel_layer_norm(x.detach(), weight, bias, EPS)
    torch.library.opcheck(torch.ops.kbnet.channel_layer_norm_backward.default,
                          (grad, x.detach(), weight, mean, rstd))


def test_export_traces_pytorch_layer_norm_not_a_kbnet_operator():
    """An exported graph must run without kbnet (``kbnet-export``), so tracing takes PyTorch's LayerNorm."""
    x, weight, bias, _ = case(16, torch.bfloat16, b=1)
    norm = LayerNorm2d(16).eval()
    norm.load_state_dict({"weight": weight, "bias": bias})
    norm.bfloat16()  # as kbnet.inference.inference_model holds a model for bf16 inference
    program = torch.export.export(norm, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if t.startswith("kbnet.")]
    assert any("layer_norm" in t for t in targets)
    with torch.no_grad():
        expected = F.layer_norm(x.permute(0, 2, 3, 1), (16,), norm.weight, norm.bias, EPS).permute(0, 3, 1, 2)
        torch.testing.assert_close(program.module()(x), expected)
        assert relative_error(norm(x), expected) < 2**-7  # eagerly the native kernels, float32 parameters
