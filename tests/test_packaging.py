"""The package as a user installs it from a wheel (``pip install .``), not the editable checkout the tests run on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kbnet.benchmarks.command import BENCHMARKS
from kbnet.benchmarks.common import memory_supported
from tests.helpers import ROOT


def _build_wheel(out: Path) -> Path:
    """Build from a copy of what a wheel is made of, so the build leaves nothing in the checkout."""
    source = out.parent / "source"
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "kbnet", source / "kbnet", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(out), str(source)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("kbnet-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel") / "dist")


def test_installed_wheel_has_the_native_kba_kernels(wheel: Path, tmp_path: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "kbnet/ops/kba_cpu.cpp" in names, "the wheel lost the native kernel source (package data)"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import kbnet.ops.native as n, pathlib, sys; "
             "assert pathlib.Path(n.__file__).is_relative_to(sys.argv[1]), n.__file__; "
             "print(n.available(), n.unavailable_reason())")
    env = {**os.environ, "PYTHONPATH": str(site), "KBNET_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", probe, str(site)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, check=True)
    assert result.stdout.split()[0] == "True", result.stdout + result.stderr
    assert list((tmp_path / "cache").glob("kbnet_cpu-*.so")), "the installed package did not build its kernels"


def test_installed_wheel_runs_the_benchmarks(wheel: Path, tmp_path: Path) -> None:
    """``kbnet-bench`` as pip installs it, outside any checkout: the overview, an unknown benchmark, and the KBA
    smoke run with its memory workers (child processes that must import the installed package too)."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True)
    bench = str(site / "bin" / "kbnet-bench")
    env = {**os.environ, "PYTHONPATH": str(site), "KBNET_CACHE_DIR": str(tmp_path / "cache")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)

    overview = run(bench, "--help")
    assert overview.returncode == 0, overview.stderr
    assert all(line in overview.stdout for line in BENCHMARKS.values())
    unknown = run(bench, "fastest")
    assert unknown.returncode == 2 and "invalid choice: 'fastest'" in unknown.stderr
    smoke = run(bench, "kba", "--quick", "--threads", "1", "--no-bf16")
    assert smoke.returncode == 0, smoke.stderr
    rows = [line for line in smoke.stdout.splitlines() if line.startswith("| KBNet_")]
    assert len(rows) == 6, smoke.stdout
    if memory_supported():
        assert "VmHWM" in smoke.stdout  # the peak-memory workers ran
