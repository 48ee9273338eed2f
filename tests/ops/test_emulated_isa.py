"""The AVX-512, AVX512_BF16 and AMX-BF16 kernels on any x86-64 CPU: the kernel tests against a build whose intrinsics
are emulated (``KBNET_NATIVE_EMULATE_AVX512=1``), and the real AMX build's instructions."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kbnet.ops import native
from tests.helpers import ROOT
from tests.helpers.kba import require_compiler

KERNEL_TESTS = ("tests/ops/test_kba_bf16.py", "tests/ops/test_layer_norm.py", "tests/ops/test_kba.py")
"""The bf16 kernels against the float32 ones (AMX and vdpbf16ps), the LayerNorm kernels, and KBA against the
official tensors (the 64-byte blocking)."""
MORE_KERNEL_TESTS = ("tests/models/test_bf16.py", "tests/ops/test_native.py", "tests/ops/test_kba_op.py")
"""bf16 networks end to end, the layout copies and the operator (slow: about 1.5 min more)."""

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the emulated build is x86-64 code")


@pytest.fixture(scope="module")
def emulated_cache(tmp_path_factory) -> Path:
    """One cache for the emulated library, so both runs build it once."""
    return tmp_path_factory.mktemp("emulated-cache")


def run_emulated(files: tuple[str, ...], cache: Path) -> str:
    """Runs pytest on ``files`` with the emulated kernels; returns its report after checking it passed and skipped
    nothing (no test may skip for want of AVX512_BF16 or AMX)."""
    require_compiler()
    env = {**os.environ, native.EMULATE_ENV: "1", "KBNET_CACHE_DIR": str(cache)}
    # The other -march builds are real code, compiled and compared by the native run already (20 s each here).
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-k",
                             "not test_other_builds", *files], cwd=ROOT, env=env, capture_output=True, text=True)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    skips = [line for line in report.splitlines() if line.startswith("SKIPPED")]
    assert not skips, "\n".join(skips)
    assert re.search(r"\b\d{2,} passed", report), report[-2000:]
    return report


def test_the_emulated_avx512_bf16_and_amx_kernels_pass_the_kernel_tests(emulated_cache):
    run_emulated(KERNEL_TESTS, emulated_cache)
    built = list(emulated_cache.glob("kbnet_cpu-*.so"))
    assert len(built) == 1


@pytest.mark.slow
def test_the_emulated_kernels_pass_the_network_layout_and_operator_tests(emulated_cache):
    run_emulated(MORE_KERNEL_TESTS, emulated_cache)


EMULATED_CHECK = """
from kbnet.ops import native
assert native.instruction_sets() == ("AVX-512", "AVX512_BF16", "AMX-BF16", "emulated"), native.instruction_sets()
import torch
assert torch.bfloat16 in native.native_dtypes()
print("ok")
"""


def test_an_emulated_build_says_so_and_a_bad_setting_is_named(tmp_path, emulated_cache):
    require_compiler()
    env = {**os.environ, "KBNET_CACHE_DIR": str(emulated_cache), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", EMULATED_CHECK], env={**env, native.EMULATE_ENV: "1"}, cwd=ROOT,
                            capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr[-3000:]
    bad = ("from kbnet.ops import native; assert not native.available(); print(native.unavailable_reason())")
    result = subprocess.run([sys.executable, "-c", bad], env={**env, native.EMULATE_ENV: "yes"}, cwd=ROOT,
                            capture_output=True, text=True)
    assert f"environment variable {native.EMULATE_ENV} must be 0 or 1, not 'yes'" in result.stdout, result.stderr


def test_the_real_amx_build_holds_tile_bf16_and_512_bit_instructions_and_no_emulation(monkeypatch, tmp_path):
    """The Sapphire Rapids build compiles on any machine (this one need not run it) to what the emulation stands
    in for."""
    require_compiler()
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    monkeypatch.setenv(native.MARCH_ENV, "sapphirerapids")
    monkeypatch.setenv(native.EMULATE_ENV, "0")
    monkeypatch.setenv("KBNET_CACHE_DIR", str(tmp_path))
    code = subprocess.run(["objdump", "-d", "-C", str(native._build())], capture_output=True, text=True,
                          check=True).stdout
    for instruction in ("tdpbf16ps", "vdpbf16ps", "vcvtneps2bf16", "ldtilecfg", "zmm"):
        assert instruction in code, f"the AMX build has no {instruction}"
    assert "kbnet_emulated" not in code
