"""The benchmark scripts run end to end in quick mode (tiny shapes), so they cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from kbnet import allocator
from kbnet.benchmarks import allocator as allocator_benchmark
from kbnet.benchmarks import command, common
from kbnet.benchmarks import grouped_conv as grouped_conv_benchmark
from kbnet.benchmarks import kba as kba_benchmark
from kbnet.benchmarks import layer_norm as layer_norm_benchmark
from kbnet.benchmarks import models as models_benchmark
from kbnet.benchmarks.common import bf16_kernels, cpu_model, machine_line, matmul_rates, memory_supported
from kbnet.errors import DataError
from kbnet.models.layers import GroupedConv2d
from kbnet.ops import native
from tests.helpers.tables import table_rows


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_kba_benchmark_quick(capsys):
    kba_benchmark.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    rows = table_rows(out, "KBNet_")
    assert len(rows) == len(kba_benchmark.cases(quick=True)) == 6
    assert all(re.fullmatch(r"\d+\.\d\d×", row[11]) for row in rows)  # forward+backward speed-up
    # shares of the fp32 matmul rate: forward, f+b on the official FLOPs, f+b on the FLOPs the native kernels execute
    assert all(re.fullmatch(r"\d+ %", cell) for row in rows for cell in row[18:21])
    assert all(int(row[20][:-2]) >= int(row[19][:-2]) for row in rows)  # 1.3× the official f+b FLOPs
    assert cpu_model() in out and "matmul GFLOP/s: float32" in out and ", bfloat16" in out
    assert "Allocator of the timed runs: glibc default." in out
    if bf16_kernels():
        amx = "AMX-BF16" in native.instruction_sets()  # then also the bf16 variant without the tile kernels
        assert all(len(row) == 26 + 4 * amx and re.fullmatch(r"\d+ %", row[25]) for row in rows)
        assert all(re.fullmatch(r"\d+\.\d\d×", cell) for row in rows for cell in row[28:30])
        assert ("vdpbf16ps:" in out) == amx
    else:
        assert all(len(row) == 21 for row in rows) and "no AVX512_BF16" in out
    if memory_supported():
        assert "VmHWM" in out
        assert all(float(row[14]) > 0 for row in rows)  # the reference's peak is never zero


def test_kba_benchmark_counts_kernel_flops_only_for_the_native_kernels(capsys):
    kba_benchmark.main(["--quick", "--threads", "1", "--impls", "torch,reference", "--no-memory", "--no-bf16"])
    out = capsys.readouterr().out
    assert all(len(row) == 20 for row in table_rows(out, "KBNet_"))
    assert "kernel FLOPs" not in out and "FLOPs they execute" not in out


def test_kernel_flops_are_the_four_applications_of_the_bases():
    case = kba_benchmark.Case("KBNet_s", "L1", 64, 4, 1, 256, 1)
    applications = 256**2 * 32 * 64 * 4 * 9 / 1e9  # every pixel's neighbourhood through all 32 bases, once
    assert 4 * applications < case.kernel_gmacs < 4.2 * applications  # plus the mixing and grad_x's application
    assert case.kernel_gmacs / (3 * case.gmacs) == pytest.approx(1.295, abs=1e-3)


def test_models_benchmark_quick(capsys):
    models_benchmark.main(["--quick", "--threads", "1", "--models", "kbnet_s_tiny", "kbnet_l_tiny"])
    out = capsys.readouterr().out
    speed = table_rows(out, "kbnet_")
    assert [(row[0], row[1]) for row in speed[:4]] == [("kbnet_s_tiny", "inference"), ("kbnet_s_tiny", "train step"),
                                                       ("kbnet_l_tiny", "inference"), ("kbnet_l_tiny", "train step")]
    assert all(len(row) == (16 if bf16_kernels() else 12) for row in speed[:4])  # bf16 time, ratio and floor
    if memory_supported():
        memory = speed[4:]
        assert [row[0] for row in memory] == ["kbnet_s_tiny", "kbnet_l_tiny"]
        # largest image within the budget; "-" when the tiny quick sizes measure the same peak
        assert all(re.fullmatch(r"\d+²|-", row[8]) for row in memory)


@pytest.mark.skipif(not allocator.supported() or not memory_supported(), reason="compares glibc malloc settings")
def test_allocator_benchmark_quick(capsys):
    allocator_benchmark.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    rows = table_rows(out, "kbnet_")
    tasks = ["train step, float32", "train step, bf16 autocast", "inference, float32"]
    assert [(row[0], row[1]) for row in rows] == [(m, t) for m in ("kbnet_s_tiny", "kbnet_l_tiny") for t in tasks]
    assert all(re.fullmatch(r"\d+\.\d\d×", row[5]) and re.fullmatch(r"\d+\.\d\d×", row[10]) for row in rows)
    assert all(int(row[6]) >= 0 and int(row[7]) >= 0 and float(row[8]) >= 0 for row in rows)
    assert cpu_model() in out


def test_layer_norm_benchmark_quick(capsys):
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    assert layer_norm_benchmark.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out, "KBNet_")
    levels = [("KBNet_s", "L1/8", 8, 32), ("KBNet_l", "L1/8", 6, 32), ("KBNet_l", "L2/8", 12, 16)]
    assert [row[:4] for row in rows] == [[net, level, f"{c}×{side}²×{batch}", dtype] for net, level, c, side in levels
                                         for batch in (1, 2) for dtype in ("float32", "bf16")]
    assert all(re.fullmatch(r"\d+\.\d\d×", row[6]) and re.fullmatch(r"\d+\.\d\d×", row[9]) for row in rows)
    assert cpu_model() in out


def test_grouped_conv_benchmark_quick(capsys):
    assert grouped_conv_benchmark.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    levels = [("KBNet_s", "L1/8", "8/4", 32), ("KBNet_l", "L1/8", "6/3", 32), ("KBNet_l", "L2/8", "12/3", 16)]
    rows = table_rows(out, "KBNet_")
    assert [row[:5] for row in rows] == [[net, level, c, f"{side}²", str(batch)] for net, level, c, side in levels
                                         for batch in (1, 2)]
    assert all(re.fullmatch(r"\d+\.\d\d×", row[7]) and re.fullmatch(r"\d+\.\d\d×", row[12]) for row in rows)
    models = table_rows(out, "kbnet_")
    assert [row[:3] for row in models] == [[name, task, shape] for name in ("kbnet_s_tiny", "kbnet_l_tiny")
                                           for task, shape in (("inference", "16²×1"), ("train step", "16²×2"))]
    assert cpu_model() in out


def test_grouped_conv_benchmark_refuses_a_size_without_a_deepest_level(capsys):
    assert grouped_conv_benchmark.main(["--size", "200", "--no-models"]) == 2
    assert "--size must be a multiple of 16" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["kbnet_s_tiny", "kbnet_l_tiny"])
def test_grouped_conv_benchmark_compares_the_same_network(name):
    """The "plain" backbone has no GroupedConv2d left and computes what the built one does."""
    model = models_benchmark.build(name).eval()
    plain = grouped_conv_benchmark.with_plain_convolutions(model)
    assert any(type(m) is GroupedConv2d for m in model.modules())
    assert not any(isinstance(m, GroupedConv2d) for m in plain.modules())
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), rtol=1e-4, atol=1e-5)


def test_layer_norm_benchmark_refuses_a_size_without_a_deepest_level(capsys):
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    assert layer_norm_benchmark.main(["--size", "200"]) == 2
    assert "--size must be a multiple of 16" in capsys.readouterr().err


def test_largest_side_is_linear_in_pixels():
    fit = {"100": 1_000 + 100**2 * 10, "200": 1_000 + 200**2 * 10}
    budget = 1_500 + 1000**2 * 10
    assert models_benchmark.largest_side(fit, weights=500, budget=budget, multiple=16) == "992²"  # 1000 rounded down
    assert models_benchmark.largest_side(fit, weights=500, budget=budget, multiple=8) == "1000²"
    assert models_benchmark.largest_side({"8": 4096, "16": 4096}, weights=500, budget=10**9, multiple=16) == "-"
    assert models_benchmark.predicted_peak(fit, 500, 1000) == 1_500 + 1000**2 * 10


def test_unknown_implementation_is_refused(capsys):
    with pytest.raises(SystemExit):
        kba_benchmark.main(["--quick", "--impls", "auto,fastest"])
    assert "fastest" in capsys.readouterr().err


COUNT_OPTIONS = {"kba": ("--threads", "--repeats", "--sizes"), "models": ("--threads", "--repeats", "--verify-size"),
                 "deploy": ("--threads", "--repeats"), "allocator": ("--threads",),
                 "layer_norm": ("--threads", "--repeats", "--size")}


@pytest.mark.parametrize(("name", "option"), [(name, option) for name, options in COUNT_OPTIONS.items()
                                              for option in options])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_counts_and_sides_below_one_are_usage_errors(capsys, name, option, value):
    """``--threads 0`` was a torch traceback and ``--repeats 0`` a silent default."""
    with pytest.raises(SystemExit) as exit_info:
        command.main([name, option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: expected a positive integer, got '{value}'" in capsys.readouterr().err


def test_kbnet_bench_lists_every_benchmark_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        command.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for name, line in command.BENCHMARKS.items():
        assert re.search(rf"^  {name} +{re.escape(line)}$", out, re.M), name


def test_kbnet_bench_refuses_an_unknown_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        command.main(["fastest", "--quick"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


def test_kbnet_bench_hands_the_rest_of_the_command_line_to_the_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        command.main(["kba", "--quick", "--impls", "auto,fastest"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "kbnet-bench kba: error: --impls needs at least two of" in err and "fastest" in err


def test_a_user_error_in_a_benchmark_is_one_line_and_status_2(monkeypatch, capsys):
    def missing(*args, **kwargs):
        raise DataError("no such case file")

    monkeypatch.setattr(kba_benchmark, "measure", missing)
    assert command.main(["kba", "--quick", "--no-memory"]) == 2
    assert capsys.readouterr().err == "error: no such case file\n"


def test_an_unknown_model_is_one_line_and_status_2_before_anything_is_measured(monkeypatch, capsys):
    def measured(*args, **kwargs):
        raise AssertionError("measured before the model names were checked")

    monkeypatch.setattr(models_benchmark, "matmul_rates", measured)
    assert command.main(["models", "--models", "kbnet_s_tiny", "kbnet_x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'kbnet_x'; available: ") and err.count("\n") == 1


@pytest.mark.parametrize("isas", [["AVX2"], ["AVX2", "AVX-512", "AVX512_BF16"], ["AVX2", "AMX", "AMX-BF16"]])
def test_the_bf16_matmul_rate_is_measured_only_on_cpus_with_bf16_instructions(monkeypatch, isas):
    monkeypatch.setattr(common, "cpu_instruction_sets", lambda: isas)
    rates = matmul_rates(size=64, repeats=1)
    has_bf16 = len(isas) > 1
    assert sorted(rates) == ["bfloat16", "float32"][not has_bf16:] and all(r > 0 for r in rates.values())
    line = machine_line(1, rates)
    assert ("bfloat16 not measured (no bf16 instructions: emulated)" in line) != has_bf16
    assert re.search(r"matmul GFLOP/s: float32 \d+, bfloat16 ", line)


@pytest.mark.skipif(not allocator.supported(), reason="training's allocator setting needs glibc's malloc")
@pytest.mark.parametrize("env, status", [({}, 0), ({"KBNET_RETAIN_FREED_MEMORY": "0"}, 2)])
def test_kba_benchmark_times_with_trainings_allocator_on_request(env, status):
    # In a fresh process: keeping freed memory is one-way for the process that asks for it.
    result = subprocess.run([sys.executable, "-m", "kbnet.benchmarks.kba", "--quick", "--no-memory", "--no-bf16",
                             "--threads", "1", "--retain-freed-memory"], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=300)
    assert result.returncode == status, result.stderr
    if status == 0:
        assert "Allocator of the timed runs: freed memory kept (as in training)." in result.stdout
        assert len(table_rows(result.stdout, "KBNet_")) == 6
    else:
        assert "--retain-freed-memory needs glibc's malloc and KBNET_RETAIN_FREED_MEMORY unset or 1" in result.stderr
