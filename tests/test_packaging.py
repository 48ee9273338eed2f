"""The package as a user installs it from a wheel (``pip install .``), not the editable checkout the tests run on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def test_installed_wheel_has_the_native_kba_kernels(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path / "dist")
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
    assert list((tmp_path / "cache").glob("kba_cpu-*.so")), "the installed package did not build its kernels"
