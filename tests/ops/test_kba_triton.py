"""The Triton kernels under Triton's interpreter (``tests/helpers/kba_triton_cases.py``), in a subprocess: the
interpreter must be chosen before triton is imported and then holds for the whole process, so it cannot be switched
on for a few tests of this one without leaking into the others."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kbnet.ops import kba_triton
from tests.helpers import ROOT


@pytest.mark.skipif(kba_triton.import_error() is not None, reason=str(kba_triton.import_error()))
@pytest.mark.parametrize("marks", ["not slow", pytest.param("slow", marks=pytest.mark.slow)])
def test_triton_kernels_under_the_interpreter(marks):
    """The cases of the selected kind (``-m slow`` selects the slow variant, which runs the slow cases)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marks,
                             "tests/helpers/kba_triton_cases.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in summary and "skipped" not in summary, summary
