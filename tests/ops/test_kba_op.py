"""The registered KBA operator: torch.library checks, torch.compile without graph breaks, torch.export, the
implementation choice per device, the slab budget per device, and the launch counts of a training step."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode

import kbnet.ops.kernel_basis as kba_module
from kbnet.errors import UserError
from kbnet.models import create_model
from kbnet.ops import kba, kba_triton, launches, use_kba
from tests.helpers.kba import random_case, require_native

TINY = ("kbnet_s_tiny", "kbnet_l_tiny")


def kba_calls(model: torch.nn.Module) -> int:
    return sum(type(m).__name__ == "KernelBasisAttention" for m in model.modules())


@pytest.mark.parametrize("impl", ["native", "native-channels-last", pytest.param("torch", marks=pytest.mark.slow)])
def test_operators_pass_torch_library_opcheck(impl):
    """Schema, fake implementation (shapes and strides, channels-last included), autograd registration and AOT
    dispatch of the forward and of the fused backward operator."""
    require_native()
    inputs, k, groups = random_case(b=1, c=8, h=5, w=6, nset=3, groups=2)
    if impl.endswith("channels-last"):
        inputs[0] = inputs[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    name = impl.split("-")[0]
    torch.library.opcheck(torch.ops.kbnet.kba.default, (*inputs, k, groups, name))
    grad = torch.randn(1, 8, 5, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.kbnet.kba_backward.default,
                          (*[t.detach() for t in inputs], grad, k, groups, name))


def compile_and_compare(name: str) -> list[list[str]]:
    """Forward + backward of the tiny preset compiled with ``fullgraph=True`` (a graph break raises) against eager;
    returns the kbnet operators of each compiled graph (forward, backward)."""
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.rand(2, 3, 16, 16)
    graphs: list[list[str]] = []

    def record(gm, example_inputs):
        graphs.append(sorted({str(n.target) for n in gm.graph.nodes if str(n.target).startswith("kbnet.")}))
        return make_boxed_func(gm)
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    for got, want in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    return graphs


@pytest.mark.parametrize("name", [TINY[0], pytest.param(TINY[1], marks=pytest.mark.slow)])
def test_compile_fullgraph_has_no_graph_break_and_keeps_the_fused_kernels(name):
    require_native()
    graphs = compile_and_compare(name)
    assert graphs == [["kbnet.kba.default"], ["kbnet.kba_backward.default"]]


@pytest.mark.parametrize("name", [TINY[1]])
def test_no_graph_break(name):
    """``torch._dynamo.explain`` names any break; cheaper than compiling forward and backward (done above)."""
    torch.manual_seed(0)
    model = create_model(name)
    explanation = torch._dynamo.explain(model)(torch.rand(1, 3, 16, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", TINY)
def test_export_with_the_default_implementation(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.rand(1, 3, 16, 16)
    program = torch.export.export(model, (x,))
    nodes = [n for n in program.graph.nodes if n.target is torch.ops.kbnet.kba.default]
    assert len(nodes) == kba_calls(model)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-6)


def test_auto_on_cuda_picks_triton_and_falls_back_with_the_reason_once(monkeypatch):
    monkeypatch.setattr(kba_triton, "import_error", lambda: None)
    monkeypatch.setattr(kba_module, "_warned_fallbacks", set())
    assert kba_module._resolve("auto", "cuda", torch.bfloat16, 16, 32, 4, 3) == "triton"
    with pytest.warns(RuntimeWarning, match="float32, bfloat16 or float16; got torch.float64"):
        assert kba_module._resolve("auto", "cuda", torch.float64, 16, 32, 4, 3) == "torch"
    with pytest.warns(RuntimeWarning, match="16 channels per group with kernel size 3"):
        assert kba_module._resolve("auto", "cuda", torch.float32, 16, 32, 1, 3) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kba_module._resolve("auto", "cuda", torch.float32, 16, 32, 1, 3) == "torch"  # warned once only


def test_auto_on_cuda_without_triton_names_the_extra(monkeypatch):
    monkeypatch.setattr(kba_triton, "import_error", lambda: "triton is not installed; pip install 'kbnet[gpu]'")
    monkeypatch.setattr(kba_module, "_warned_fallbacks", set())
    with pytest.warns(RuntimeWarning, match=r"kbnet\[gpu\]"):
        assert kba_module._resolve("auto", "cuda", torch.float32, 16, 32, 4, 3) == "torch"


def test_triton_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs, k, groups = random_case(dtype=torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kba(*inputs, k, groups, impl="triton")


def test_slab_budget_per_device(monkeypatch):
    monkeypatch.delenv("KBNET_KBA_SLAB_MB", raising=False)
    assert kba_module.slab_budget(torch.device("cpu")) == kba_module.SLAB_BYTES
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=2**37))
    assert kba_module.slab_budget(torch.device("cuda")) == 2**37 // 16
    monkeypatch.setenv("KBNET_KBA_SLAB_MB", "2048")
    assert kba_module.slab_budget(torch.device("cuda")) == kba_module.slab_budget(torch.device("cpu")) == 2**31
    for bad in ("lots", "0", "-3"):
        monkeypatch.setenv("KBNET_KBA_SLAB_MB", bad)
        with pytest.raises(UserError, match=f"KBNET_KBA_SLAB_MB='{bad}'.*positive number of MiB"):
            kba_module.slab_budget(torch.device("cpu"))


def test_slab_budget_variable_reaches_the_pytorch_path(monkeypatch):
    """A one-row budget launches per row; 2 GiB runs the whole image as one slab, with the same result."""
    inputs, k, groups = random_case(b=1, c=8, h=12, w=5, nset=3, groups=2)
    results, calls = [], []
    for mib in ("0.0001", "2048"):
        monkeypatch.setenv("KBNET_KBA_SLAB_MB", mib)
        calls.append(launches.count(lambda: results.append(kba(*inputs, k, groups, impl="torch"))).aten)
    assert calls[0] > 5 * calls[1]
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=0)


def real_cpu_step(name: str, impl: str) -> launches.Launches:
    torch.manual_seed(0)
    model = create_model(name).train()
    x, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)

    def step() -> None:
        with use_kba(impl):
            F.l1_loss(model(x), target).backward()
    return launches.count(step)


@pytest.mark.parametrize("name", [TINY[0], pytest.param(TINY[1], marks=pytest.mark.slow)])
def test_counting_on_fake_tensors_equals_a_real_cpu_step(name):
    """The launch table runs on fake tensors; that only holds if they see the operator calls of a real step.
    (At batch 1, 8², KBNet_l's counts differ by 4 %: size-one dimensions; the table uses batch 8, 128².)"""
    require_native()
    for impl in ("reference", "torch", "native"):
        assert launches.count_training_step(name, impl, 2, 16) == real_cpu_step(name, impl), impl


def test_triton_dry_run_counts_its_launches():
    with FakeTensorMode(), kba_triton.dry_run():
        inputs, k, groups = random_case(dtype=torch.float32)
        counted = launches.count(lambda: kba(*inputs, k, groups, impl="triton").sum().backward())
    assert counted.triton == 4  # forward; grad x, grad att, grad weight + bias


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kbnet_s_sidd", "kbnet_l"])
def test_launch_targets_at_batch_8_128(name, monkeypatch):
    """Issue targets: Triton fewer launches than the official formulation; PyTorch slabs with 2 GiB ≤ 1.2×."""
    reference = launches.count_training_step(name, "reference", 8, 128).total
    assert launches.count_training_step(name, "triton", 8, 128).total < reference
    monkeypatch.setenv("KBNET_KBA_SLAB_MB", "2048")
    assert launches.count_training_step(name, "torch", 8, 128).total <= 1.2 * reference


def test_the_operator_refuses_an_implementation_it_has_no_kernel_for():
    inputs, k, groups = random_case()
    with pytest.raises(ValueError, match="not 'reference'"):
        torch.ops.kbnet.kba(*inputs, k, groups, "reference")
