"""Freed memory kept for reuse (``kbnet.allocator``): fresh processes show the page faults it saves, training turns
it on, and the environment switch is checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kbnet import allocator
from kbnet.errors import UserError
from kbnet.training import train
from tests.helpers.configs import compose_train, tiny_run_overrides

PROBE = """
import resource, torch
from kbnet.allocator import retain_freed_memory
from kbnet.models import create_model
retained = retain_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
model = create_model("kbnet_s_tiny").eval()
x = torch.rand(1, 3, 384, 384)
with torch.no_grad():
    for _ in range(2):  # warm-up: the heap grows to the pass's high-water mark
        model(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        model(x)
print(retained, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

needs_glibc = pytest.mark.skipif(not allocator.supported(), reason="kbnet.allocator tunes glibc's malloc only")


def probe(setting: str | None) -> tuple[bool, int]:
    """(whether the setting took effect, page faults of three repeated forward passes) in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != allocator.ENV}
    if setting is not None:
        env[allocator.ENV] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    return out[0] == "True", int(out[1])


@needs_glibc
def test_repeated_passes_reuse_freed_memory_instead_of_faulting_it_in_again():
    """glibc's default returns the activations' blocks to the kernel (29 000–150 000 faults measured for these
    passes); kept for reuse they fault 20× less or not at all. ``0`` keeps the default."""
    (retained, faults), (default_kept, default_faults) = probe(None), probe("0")
    assert retained and not default_kept
    assert faults * 5 < default_faults, (faults, default_faults)


def test_a_bad_setting_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "yes")
    with pytest.raises(UserError, match=f"{allocator.ENV}='yes'.*expected 1 .* or 0"):
        allocator.retain_freed_memory()


def test_training_keeps_freed_memory_for_reuse(tmp_path: Path, monkeypatch):
    calls = []
    monkeypatch.setattr("kbnet.training.retain_freed_memory", lambda: calls.append(1) or True)
    train(compose_train(*tiny_run_overrides(tmp_path / "run"), "trainer.max_steps=1",
                        "trainer.val_check_interval=1"))
    assert calls == [1]
