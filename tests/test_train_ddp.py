"""Two processes with DDP on CPU (gloo), launched like a user does: `python train.py ... strategy=ddp`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from kbnet.training import CONFIG_FILE
from tests.conftest import ROOT, tiny_run_overrides


def test_two_process_ddp_run_on_cpu(tmp_path: Path) -> None:
    overrides = [o for o in tiny_run_overrides(tmp_path) if not o.startswith("paths.output_dir=")]
    overrides += [f"paths.log_dir={tmp_path}", "run_name=ddp", "strategy=ddp", "trainer.devices=2",
                  "global_batch_size=16", "data.train_repeat=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "gaussian_denoise" / "ddp"
    assert (run_dir / CONFIG_FILE).is_file()
    assert "global batch 16 = 8 per device x 2 devices x 1 nodes" in result.stdout + result.stderr
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
