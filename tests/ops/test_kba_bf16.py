"""The bf16 KBA kernels (AMX tiles and AVX512_BF16) against the float32 kernels, other builds (AVX2, AVX512_BF16
without AMX) against the machine's build, and the choice of the compute dtype under autocast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kbnet.benchmarks.common import cpu_instruction_sets
from kbnet.models import create_model
from kbnet.ops import kba, native
from tests.helpers import ROOT
from tests.helpers.kba import require_bf16, require_native
from tests.helpers.reference import relative_error

BF16_ROUNDING = 2.0**-8
"""bf16 keeps 8 significant bits: a value rounded to nearest bf16 is within this fraction of itself."""


def rounded_from(rounded: torch.Tensor, exact: torch.Tensor) -> bool:
    """Whether every value of the bf16 ``rounded`` is ``exact`` rounded (allowing float32 summation-order noise)."""
    return bool(((rounded.float() - exact).abs() <= BF16_ROUNDING * exact.abs() * (1 + 1e-4) + 1e-6).all())


pytestmark = pytest.mark.usefixtures("single_thread")


def bf16_case(b, c, h, w, nset, groups, seed=0, k=3):
    """Inputs whose values are exact in bf16, so the bf16 and float32 kernels see the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    gc = c // groups
    tensors = [torch.randn(b, c, h, w, generator=gen), torch.randn(b, nset, h, w, generator=gen),
               torch.randn(1, nset, c * gc * k * k, generator=gen) * 0.1, torch.randn(1, nset, c, generator=gen)]
    grad = torch.randn(b, c, h, w, generator=gen)
    return [t.bfloat16().float() for t in tensors], grad.bfloat16().float()


@pytest.fixture(params=["amx", "avx512_bf16"])
def bf16_path(request):
    """The bf16 forward and grad_att on AMX tiles (where the CPU has them) and on ``vdpbf16ps``."""
    require_bf16()
    if request.param == "amx":
        if "AMX-BF16" not in native.instruction_sets():
            pytest.skip(f"this CPU has no AMX-BF16 (kernels built for {native.instruction_sets()})")
        yield
    else:
        with native.amx_disabled():
            yield


@pytest.mark.usefixtures("bf16_path")
@pytest.mark.parametrize("split", [False, True], ids=["as-used", "split-tasks"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("b, c, h, w, nset, groups, k", [
    (2, 16, 9, 21, 8, 4, 3),  # 4 channels per group (KBNet_s), padded rows, an odd nset remainder for gc 4
    (1, 12, 11, 17, 5, 6, 3),  # 2 channels per group (KBNet_l), odd nset
    (1, 16, 6, 7, 4, 2, 3),  # 8 channels per group, narrow: columns
    (1, 8, 8, 10, 32, 4, 3),  # 32 bases: grad_w's blocks of two vectors of bases
    (1, 4, 7, 12, 3, 2, 5),  # 5×5 kernels: single rows after grad_w's blocks of 12
    (1, 8, 5, 6, 40, 2, 3),  # 4 per group, narrow (columns), 40 bases: two tiles of coefficient pairs on AMX
    (2, 8, 6, 5, 6, 4, 3),  # 2 per group, narrow (columns)
])
def test_bf16_kernels_match_the_float32_kernels(monkeypatch, split, channels_last, b, c, h, w, nset, groups, k):
    """Same numbers in, float32 sums inside: the bf16 path differs from the float32 one only by summation order and
    the final rounding of its bf16 results, except for the bases' gradient (float32), whose products grad_out·x are
    rounded to bf16: it agrees to float32 precision with that sum and to bf16 precision with the float32 path.
    On AMX the bias enters the tile products as three bf16 parts that sum to it exactly."""
    if split:
        monkeypatch.setattr(native, "POSITIONS_PER_TASK", 16)
        monkeypatch.setattr(native, "MACS_PER_THREAD", 1)
        torch.set_num_threads(2)
    (x, att, weight, bias), grad = bf16_case(b, c, h, w, nset, groups, k=k)
    if channels_last:
        x, att = x.contiguous(memory_format=torch.channels_last), att.contiguous(memory_format=torch.channels_last)
    out32 = native.forward(x, att, weight, bias, k, groups)
    grads32 = native.backward(x, att, weight, bias, grad, k, groups)
    out16 = native.forward(x.bfloat16(), att.bfloat16(), weight, bias, k, groups)
    grads16 = native.backward(x.bfloat16(), att.bfloat16(), weight, bias, grad.bfloat16(), k, groups)
    assert out16.dtype == torch.bfloat16
    assert out16.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert rounded_from(out16, out32)
    for name, g16, g32 in zip(("x", "att", "weight", "bias"), grads16, grads32, strict=True):
        if name in ("x", "att"):
            assert g16.dtype == torch.bfloat16 and rounded_from(g16, g32), name
        elif name == "weight":
            assert g16.dtype == torch.float32
            assert relative_error(g16, weight_grad_of_rounded_products(x, att, grad, groups, k)) < 1e-6
            assert relative_error(g16, g32) < BF16_ROUNDING
        else:
            assert g16.dtype == torch.float32 and relative_error(g16, g32) < 1e-6, name


@pytest.mark.usefixtures("bf16_path")
def test_bf16_bases_are_read_as_given_and_reused_scratch_leaves_no_trace():
    """The kernels read the bases in the dtype the caller holds (float32, or bfloat16 from a bf16 inference model)
    with the same results, and the packed bases they keep between calls, still holding a larger call's words when
    a smaller one follows, change nothing."""
    small, small_grad = bf16_case(1, 8, 9, 12, 40, 2)  # 4 channels per group, padded rows
    big, big_grad = bf16_case(1, 64, 9, 12, 32, 16)  # six times the packed words of the small case

    def run(case, grad, groups, bases_dtype=torch.float32):
        x, att, weight, bias = case
        args = (x.bfloat16(), att.bfloat16(), weight.to(bases_dtype), bias.to(bases_dtype))
        return [native.forward(*args, 3, groups), *native.backward(*args, grad.bfloat16(), 3, groups)]

    first = run(small, small_grad, 2)
    run(big, big_grad, 16)
    for again in (run(small, small_grad, 2), run(small, small_grad, 2, torch.bfloat16)):
        for i, (a, b) in enumerate(zip(first, again, strict=True)):  # gradients come in the dtype of their input
            assert torch.equal(a.to(b.dtype), b), i


def weight_grad_of_rounded_products(x, att, grad, groups, k=3):
    """The bases' gradient Σ_p a·bf16(grad_out·u) in float64: the sum the bf16 kernels compute in float32."""
    b, c, h, w = x.shape
    gc, nset = c // groups, att.shape[1]
    taps = F.unfold(x, k, padding=k // 2).view(b, groups, 1, gc * k * k, h * w)
    products = (grad.view(b, groups, gc, 1, h * w) * taps).bfloat16().double()  # exact in float32, then rounded
    grad_w = torch.einsum("bnp,bqrjp->nqrj", att.flatten(2).double(), products)
    return grad_w.reshape(1, nset, c * gc * k * k)


def test_bf16_autocast_computes_in_bf16_and_returns_float32_gradients():
    require_bf16()
    (x, att, weight, bias), grad = bf16_case(1, 16, 12, 12, 8, 4)
    leaves = [t.clone().requires_grad_() for t in (x, att, weight, bias)]
    calls = []
    forward = native.forward

    def recording(*args):
        calls.append([a.dtype for a in args[:4]])
        return forward(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "forward", recording)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = kba(*leaves, 3, 4)
    assert calls == [[torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]]
    assert out.dtype == torch.bfloat16
    out.backward(grad.bfloat16())
    expected = native.backward(x.bfloat16(), att.bfloat16(), weight, bias, grad.bfloat16(), 3, 4)
    for leaf, g in zip(leaves, expected, strict=True):
        assert leaf.grad.dtype == torch.float32
        assert torch.equal(leaf.grad, g.float())


class _Casts(TorchDispatchMode):
    """The shapes of the tensors ``_to_copy`` converts."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model", ["kbnet_s_tiny", "kbnet_l_tiny"])
def test_a_bf16_training_step_casts_no_feature_map(model):
    """With the bf16 kernels a bf16 autocast training step keeps every feature map in bf16 between layers: around
    KBA, the layer norms and the element-wise operations nothing is cast. The casts left are autocast's of the
    weights, of the image and of the loss's gradient, and KBNet_l's channel-attention matrices (autocast computes
    softmax in float32)."""
    require_bf16()
    torch.manual_seed(0)
    net = create_model(model).to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    levels = {40 >> i for i in range(4)}  # the levels' spatial sizes; attention matrices are (heads, d, d), d ≥ 12

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.l1_loss(net(x).float(), x)
        loss.backward()

    step()  # autocast's weight cache and the kernels' scratch
    with _Casts() as casts:
        step()
    maps = [shape for shape in casts.shapes if len(shape) == 4 and shape[-1] in levels and shape[-2] in levels]
    assert maps and all(shape == tuple(x.shape) for shape in maps), maps


def test_without_bf16_kernels_autocast_computes_in_float32(monkeypatch):
    """A CPU without AVX512_BF16: bf16 autocast casts around float32 kernels, and bf16 tensors are not native."""
    require_native()
    monkeypatch.setattr(native, "instruction_sets", lambda: ("AVX2",))
    assert native.native_dtypes() == (torch.float32, torch.float64)
    assert native.compute_dtype(torch.bfloat16) == torch.float32
    assert not native.supports(torch.zeros(1, 8, 4, 4, dtype=torch.bfloat16), 2)
    (x, att, weight, bias), _ = bf16_case(1, 8, 6, 10, 4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kba(x, att, weight, bias, 3, 2, impl="native")
    assert torch.equal(out, native.forward(x, att, weight, bias, 3, 2).bfloat16())


def test_bf16_needs_an_even_group_size():
    require_bf16()
    x = torch.zeros(1, 8, 4, 4, dtype=torch.bfloat16)
    assert native.supports(x, 4) and not native.supports(x, 8)
    assert native.supports(x.float(), 8)


BUILD_SCRIPT = """
import json, sys, torch
from kbnet.ops import native
torch.manual_seed(0)
inputs = [torch.randn(2, 16, 9, 21), torch.randn(2, 8, 9, 21), torch.randn(1, 8, 16 * 4 * 9) * 0.1,
          torch.randn(1, 8, 16)]
grad = torch.randn(2, 16, 9, 21)
dtype = getattr(torch, sys.argv[2])
inputs[:2], grad = [t.to(dtype) for t in inputs[:2]], grad.to(dtype)
results = [native.forward(*inputs, 3, 4), *native.backward(*inputs, grad, 3, 4)]
torch.save(results, sys.argv[1])
print(json.dumps({"isa": native.instruction_sets(), "dtypes": [str(d) for d in native.native_dtypes()]}))
"""


@pytest.mark.parametrize("march, dtype, isa", [
    ("haswell", torch.float32, ["AVX2"]),  # the AVX2 code
    ("cooperlake", torch.bfloat16, ["AVX-512", "AVX512_BF16"]),  # bf16 kernels without AMX tiles
])
def test_other_builds_compile_and_match(tmp_path, march, dtype, isa):
    """The kernels built for another CPU (``-march``, into a separate cache) give this machine's results."""
    require_native()
    if dtype == torch.bfloat16:
        require_bf16()
        if "AVX512_BF16" not in cpu_instruction_sets():
            pytest.skip(f"the {march} build runs AVX512_BF16 instructions, which this CPU lacks (its kernels are "
                        f"{native.instruction_sets()})")
    env = {**os.environ, native.MARCH_ENV: march, native.EMULATE_ENV: "0",
           "KBNET_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(tmp_path / "other.pt"), str(dtype)[6:]], env=env,
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    dtypes = ["torch.float32", "torch.float64"] + ["torch.bfloat16"] * (dtype == torch.bfloat16)
    assert info == {"isa": isa, "dtypes": dtypes}
    assert len(list((tmp_path / "cache").glob("kbnet_cpu-*.so"))) == 1
    torch.manual_seed(0)
    inputs = [torch.randn(2, 16, 9, 21), torch.randn(2, 8, 9, 21), torch.randn(1, 8, 16 * 4 * 9) * 0.1,
              torch.randn(1, 8, 16)]
    grad = torch.randn(2, 16, 9, 21)
    inputs[:2], grad = [t.to(dtype) for t in inputs[:2]], grad.to(dtype)
    ours = [native.forward(*inputs, 3, 4), *native.backward(*inputs, grad, 3, 4)]
    tolerance = 1e-6 if dtype == torch.float32 else BF16_ROUNDING  # bf16: summation order, then one rounding
    for a, b in zip(torch.load(tmp_path / "other.pt"), ours, strict=True):
        assert relative_error(a.float(), b.float()) < tolerance
