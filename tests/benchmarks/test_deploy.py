"""The deployment benchmarks run end to end in quick mode (tiny shapes); they compile and export, hence slow."""

from __future__ import annotations

import re

import pytest

from kbnet.benchmarks import deploy
from kbnet.benchmarks import models as models_benchmark
from tests.helpers.tables import table_rows


@pytest.mark.slow
def test_deploy_benchmark_quick(capsys):
    deploy.main(["--quick", "--kba", "--threads", "1"])
    rows = table_rows(capsys.readouterr().out, "KBNet_")
    assert len(rows) == 3 and all(float(row[7]) < 1e-4 for row in rows)  # the formulations agree
    deploy.main(["--quick", "--threads", "1", "--models", "kbnet_s_tiny"])
    (row,) = table_rows(capsys.readouterr().out, "kbnet_")
    assert all(re.fullmatch(r"\d+\.\d\d×", cell) for cell in row[5:7]) and float(row[7]) < 1e-4


@pytest.mark.slow
def test_models_benchmark_compile_columns(capsys):
    models_benchmark.main(["--quick", "--threads", "1", "--models", "kbnet_s_tiny", "--no-memory", "--compile"])
    rows = table_rows(capsys.readouterr().out, "kbnet_")
    assert len(rows) == 2 and all(re.fullmatch(r"\d+\.\d\d×", row[13]) for row in rows)
