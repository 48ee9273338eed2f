"""The GPU benchmark's quick mode runs end to end on CPU (every section, the train.py run included), and a wrong
implementation makes it fail."""

from __future__ import annotations

import pytest
import torch

import kbnet.ops.kernel_basis as kba_module
from kbnet.benchmarks import gpu

pytestmark = pytest.mark.usefixtures("single_thread")


def test_quick_run_prints_every_section_and_passes_the_launch_targets(capsys):
    assert gpu.main(["--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for section in ("Agreement with the official formulation (float64), PASS", "KBA per level", "Whole backbones",
                    "Training throughput", "Kernel launches per training step"):
        assert section in out
    assert "images/s" in out
    launch_rows = [line for line in out.splitlines() if "official: " in line]
    assert len(launch_rows) == 4 and all(line.rstrip(" |").endswith("PASS") for line in launch_rows)


def test_a_disagreeing_implementation_fails_the_check(monkeypatch):
    slab_forward = kba_module._forward
    monkeypatch.setattr(kba_module, "_forward", lambda *args: slab_forward(*args) * 1.001)
    table, ok = gpu.check_agreement(gpu.QUICK, True, torch.device("cpu"), ["torch", "reference"])
    assert not ok
    assert "FAIL" in table


def test_without_a_checkout_the_train_run_says_it_was_not_measured(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu, "IMPORT_ROOT", tmp_path)  # an installed package: no train.py, no configs/ beside it
    note = gpu.train_throughput(gpu.QUICK, torch.device("cpu"))
    assert note.startswith("not measured: no train.py and configs/") and str(tmp_path) in note
