"""Faults (issue #12): kill -9 anywhere, a save on another file system, a full disk, a NaN, a resume of a finished
run. Nothing is lost or corrupted, and a killed-then-resumed run is bit-identical to the run that never stopped.

Kills are real SIGKILLs of a training subprocess (``tests/helpers/fault_driver.py``). Full-disk and cross-device cases
mount a small tmpfs and skip (saying why) where the machine does not allow it; ``test_failed_write_*`` inject the
same errors without mounting.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.types import RunMode

import kbnet.rundir
from kbnet.errors import UserError
from kbnet.lit.base import NonFiniteGradientError
from kbnet.rundir import (
    LOCK_FILE,
    RESULT_FILE,
    TEMP_MARKER,
    DiskWriteError,
    RunDirectoryInUse,
    RunLock,
    record_outcome,
    run_status,
    write_json,
)
from kbnet.sweep import ROW_FILE, read_rows
from kbnet.training import train
from tests.helpers import ROOT
from tests.helpers.configs import compose_train, hydra_job, tiny_run_overrides
from tests.helpers.threads import torch_threads

pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = ["trainer.max_steps=4", "callbacks.periodic_checkpoint.every_n_train_steps=1", "data.train_repeat=4",
         "logger=csv", "+logger.csv.flush_logs_every_n_steps=1"]
"""4 steps, 3 batches per epoch (an epoch boundary after step 3), validation at steps 2 and 4, last.ckpt after
every step (after the validation on steps 2 and 4): checkpoint saves 1 last@1, 2 best@2, 3 last@2 (by the best's
callback), 4 last@2 (periodic), 5 last@3, 6 best@4, 7 last@4, 8 last@4."""
TIMING_METRICS = ("train/images_per_sec",)
"""Wall-clock measurements: the only logged values that differ between two runs of the same seed."""


def exact_overrides(run_dir: Path, workers: int) -> list[str]:
    return [*tiny_run_overrides(run_dir), *EXACT, f"data.num_workers={workers}"]


def drive(overrides: list[str], **kill: str) -> subprocess.CompletedProcess:
    """``python -m tests.helpers.fault_driver`` with the kill variables ``kill`` (KBNET_KILL_STEP / KBNET_KILL_SAVE)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **kill}
    return subprocess.run([sys.executable, "-m", "tests.helpers.fault_driver", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_identical(a: Any, b: Any, where: str) -> None:
    """Exact equality of nested checkpoint content: same keys, same tensor dtypes and bits."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def logged_metrics(run_dir: Path) -> dict[tuple[int, str], set[str]]:
    """Every logged (step, metric) -> the values written for it, over all metrics.csv of the run (a resume writes
    a new version; a killed process's version holds what it logged before the kill)."""
    values: dict[tuple[int, str], set[str]] = {}
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key != "step" and value != "" and key not in TIMING_METRICS:
                        values.setdefault((int(row["step"]), key), set()).add(value)
    return values


def assert_same_run(reference: Path, run: Path) -> None:
    """Bit-identical weights, optimizer, schedule, loop and loader state, best metric, logged metrics and
    checkpoint files."""
    a, b = load(reference / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt")
    for key in ("global_step", "epoch", "state_dict", "optimizer_states", "lr_schedulers", "loops"):
        assert_identical(a[key], b[key], key)
    best = next(key for key in a["callbacks"] if key.startswith("BestMetric"))
    assert_identical(a["callbacks"][best], b["callbacks"][best], best)
    assert logged_metrics(reference) == logged_metrics(run)
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == names
    assert len([n for n in names if n.startswith("best-")]) == 1  # save_top_k=1


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The uninterrupted run per ``num_workers``, trained once per module when a test asks for it."""
    runs: dict[int, Path] = {}

    def get(workers: int) -> Path:
        if workers not in runs:
            run_dir = tmp_path_factory.mktemp(f"reference{workers}") / "run"
            with torch_threads(1):
                train(compose_train(*exact_overrides(run_dir, workers)))
            runs[workers] = run_dir
        return runs[workers]

    yield get


def kill_and_resume(run_dir: Path, workers: int, kill: dict[str, str], expected_step: int) -> None:
    """Train until the kill, check what the kill left, resume to the end."""
    killed = drive(exact_overrides(run_dir, workers), **kill)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert run_status(run_dir) == "killed"
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == expected_step
    resumed = drive([*exact_overrides(run_dir, workers), "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "was killed" in resumed.stderr
    assert run_status(run_dir) == "completed"
    assert not list(run_dir.rglob(f"*{TEMP_MARKER}*"))
    assert not (run_dir / LOCK_FILE).exists()


TRIALS = [
    # The default run has one trial per worker count: this one, and (with 2 workers, a half-written save, an
    # orphaned best) test_a_kill_inside_a_save_on_another_file_system_keeps_the_last_checkpoint.
    pytest.param(0, {"KBNET_KILL_STEP": "3:on_before_optimizer_step"}, 3, id="workers0-mid-step-at-epoch-end"),
    pytest.param(2, {"KBNET_KILL_SAVE": "3:before_rename"}, 1, marks=pytest.mark.slow,
                 id="workers2-between-best-and-last-save"),
    pytest.param(0, {"KBNET_KILL_STEP": "1:on_train_batch_start"}, 1, marks=pytest.mark.slow, id="workers0-step1"),
    pytest.param(0, {"KBNET_KILL_STEP": "2:on_validation_batch_end"}, 1, marks=pytest.mark.slow,
                 id="workers0-in-validation"),
    pytest.param(0, {"KBNET_KILL_SAVE": "5:partial"}, 2, marks=pytest.mark.slow, id="workers0-half-written-save"),
    pytest.param(0, {"KBNET_KILL_SAVE": "7:before_rename"}, 3, marks=pytest.mark.slow, id="workers0-final-best"),
    pytest.param(2, {"KBNET_KILL_STEP": "1:on_before_optimizer_step"}, 1, marks=pytest.mark.slow,
                 id="workers2-step1"),
    pytest.param(2, {"KBNET_KILL_STEP": "2:on_validation_batch_end"}, 1, marks=pytest.mark.slow,
                 id="workers2-in-validation"),
    pytest.param(2, {"KBNET_KILL_STEP": "3:on_train_batch_start"}, 3, marks=pytest.mark.slow,
                 id="workers2-next-epoch-start"),
    pytest.param(2, {"KBNET_KILL_SAVE": "2:partial"}, 1, marks=pytest.mark.slow, id="workers2-half-written-best"),
    pytest.param(2, {"KBNET_KILL_SAVE": "4:before_rename"}, 2, marks=pytest.mark.slow,
                 id="workers2-between-two-last-saves"),
]


@pytest.mark.parametrize(("workers", "kill", "expected_step"), TRIALS)
def test_kill_9_then_resume_is_bit_identical_to_the_run_that_never_stopped(
        workers: int, kill: dict[str, str], expected_step: int, reference: Any, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    kill_and_resume(run_dir, workers, kill, expected_step)
    assert_same_run(reference(workers), run_dir)


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block; skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; test_failed_write_* cover the same errors without it")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_kill_inside_a_save_on_another_file_system_keeps_the_last_checkpoint(reference: Any,
                                                                               tmp_path: Path) -> None:
    """Case 1: checkpoints on a tmpfs, ``$TMPDIR`` on the disk; the process dies with half of last.ckpt written."""
    temp_dir = tmp_path / "tmpdir"
    temp_dir.mkdir()
    with tmpfs(tmp_path / "outputs", "64m") as outputs:
        run_dir = outputs / "run"
        killed = drive(exact_overrides(run_dir, 2), KBNET_KILL_SAVE="3:partial", TMPDIR=str(temp_dir))
        assert killed.returncode == -9, killed.stderr[-3000:]
        assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 1  # the previous save, whole
        partial = list((run_dir / "checkpoints").glob(f".last.ckpt{TEMP_MARKER}*"))
        assert len(partial) == 1 and partial[0].stat().st_size > 0
        assert not list(temp_dir.iterdir())
        resumed = drive([*exact_overrides(run_dir, 2), "resume=true"], TMPDIR=str(temp_dir))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"removing {partial[0]}" in resumed.stderr
        assert_same_run(reference(2), run_dir)
        assert not list(temp_dir.iterdir())


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_where_and_how_much_is_free(tmp_path: Path) -> None:
    """Case 2: a 10 MiB tmpfs holds last.ckpt of step 1 (3.6 MB) and the best of step 2, but not the temporary
    of the last.ckpt that follows that best; the resume (after the disk grew) replays step 2 and its validation
    and ends with that one best, not two."""
    with tmpfs(tmp_path / "outputs", "10m") as outputs:
        run_dir = outputs / "run"
        checkpoints = run_dir / "checkpoints"
        overrides = [*tiny_run_overrides(run_dir), "callbacks.periodic_checkpoint.every_n_train_steps=1"]
        with pytest.raises(DiskWriteError) as error:
            train(compose_train(*overrides))
        assert isinstance(error.value, UserError)
        assert re.fullmatch(
            rf"could not write {checkpoints / 'last.ckpt'}: the disk is full \(No space left on device; "
            r"[\d.]+ MiB free on its file system\); the previous version of the file, if any, is intact\. .*",
            str(error.value))
        assert load(checkpoints / "last.ckpt")["global_step"] == 1
        orphan = next(checkpoints.glob("best-step0000002-*.ckpt"))
        assert sorted(p.name for p in checkpoints.iterdir()) == [orphan.name, "last.ckpt"]
        result = json.loads((run_dir / RESULT_FILE).read_text())
        assert result["status"] == "failed" and result["error"].startswith("DiskWriteError: could not write")

        subprocess.run(["mount", "-o", "remount,size=64m", str(outputs)], check=True)
        metrics = train(compose_train(*overrides, "resume=true"))
        assert Path(metrics["best_checkpoint"]).name == orphan.name  # saved again by the replayed validation
        assert sorted(p.name for p in checkpoints.iterdir()) == [orphan.name, "last.ckpt"]
        assert json.loads((run_dir / RESULT_FILE).read_text())["status"] == "completed"


def test_failed_write_leaves_the_old_file_and_names_path_and_free_space(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Case 2 without a mount: the rename of a finished temporary fails with ENOSPC."""
    path = tmp_path / RESULT_FILE
    write_json(path, {"status": "running"})

    def full(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kbnet.rundir.os, "replace", full)
    with pytest.raises(DiskWriteError, match=rf"could not write {path}: the disk is full \(No space left on "
                                             r"device; [\d.]+ MiB free on its file system\)"):
        write_json(path, {"status": "completed"})
    assert json.loads(path.read_text()) == {"status": "running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESULT_FILE]
    record_outcome(tmp_path, {"status": "failed"})  # logs, never raises over the error being recorded
    assert json.loads(path.read_text()) == {"status": "running"}


def test_failed_write_does_not_hide_the_error_that_ended_the_run(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The result of a failing run cannot be written (same full disk): the run's own error still surfaces."""
    run_dir = tmp_path / "run"
    real = kbnet.rundir.write_json

    def full_after_start(path: Path, data: Any) -> None:
        if Path(path).name == RESULT_FILE and data.get("status") == "failed":
            raise DiskWriteError(f"could not write {path}: the disk is full")
        real(path, data)

    monkeypatch.setattr(kbnet.rundir, "write_json", full_after_start)
    with pytest.raises(ValueError, match="no training step ran"):
        train(compose_train(*tiny_run_overrides(run_dir), "trainer.limit_train_batches=0"))


def test_resuming_a_completed_run_keeps_its_result_and_continues_only_a_raised_max_steps(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Case 3, and the settings given with the resume that continues it apply and are recorded."""
    run_dir = tmp_path / "run"
    first = train(compose_train(*tiny_run_overrides(run_dir)))
    result = (run_dir / RESULT_FILE).read_text()
    again = train(compose_train(*tiny_run_overrides(run_dir), "resume=true"))
    assert again["val/psnr_best"] == first["val/psnr_best"] and again["best_checkpoint"] == first["best_checkpoint"]
    assert (run_dir / RESULT_FILE).read_text() == result
    assert not (run_dir / "config.resume1.yaml").exists()

    changes = ["trainer.max_steps=3", "module.optimizer.weight_decay=0.01", "module.optimizer.betas=[0.8,0.99]",
               "global_batch_size=16", "data.train_repeat=4", "trainer.precision=bf16-mixed"]
    with caplog.at_level(logging.WARNING):
        more = train(compose_train(*tiny_run_overrides(run_dir), "resume=true", *changes))
    assert "completed 2 steps; trainer.max_steps=3 continues it" in caplog.text
    assert "the training loader differs from the checkpoint's" in caplog.text  # other batches: a new epoch
    assert "module.optimizer.weight_decay is 0.01 from step 2 on (the checkpoint had 0.0001)" in caplog.text
    final = load(run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 3
    group = final["optimizer_states"][0]["param_groups"][0]
    assert group["weight_decay"] == 0.01 and group["betas"] == (0.8, 0.99)
    recorded = json.loads((run_dir / RESULT_FILE).read_text())
    assert recorded["status"] == "completed" and recorded["global_step"] == 3
    assert recorded["best_val_psnr"] == more["val/psnr_best"] >= first["val/psnr_best"]
    saved = (run_dir / "config.resume1.yaml").read_text()
    for line in ("max_steps: 3", "weight_decay: 0.01", "global_batch_size: 16", "precision: bf16-mixed"):
        assert line in saved


def test_nan_advice_works_end_to_end_and_claims_only_what_exists(tmp_path: Path) -> None:
    """Case 4: lr=0.7 diverges at step 3, after the checkpoint of step 2; the advised resume with a lower rate
    trains on with that rate. The advice depends on what was saved."""
    run_dir = tmp_path / "run"
    overrides = [*tiny_run_overrides(run_dir), "trainer.max_steps=4", "trainer.val_check_interval=4"]
    with pytest.raises(NonFiniteGradientError) as error:
        train(compose_train(*overrides, "module.optimizer.lr=0.7"))
    assert "at step 3 " in str(error.value)
    assert (f"The last checkpoint, {run_dir / 'checkpoints' / 'last.ckpt'}, holds the weights of step 2: resume "
            "from it with resume=true module.optimizer.lr=0.07") in str(error.value)
    assert json.loads((run_dir / RESULT_FILE).read_text())["status"] == "failed"

    metrics = train(compose_train(*overrides, "module.optimizer.lr=0.001", "resume=true"))
    assert metrics["val/psnr"] > 0
    final = load(run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 4
    assert final["lr_schedulers"][0]["base_lrs"] == [0.001]
    assert final["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 0.001
    assert "lr: 0.001" in (run_dir / "config.resume1.yaml").read_text()

    every_step = tmp_path / "every_step"
    with pytest.raises(NonFiniteGradientError, match="holds the weights of this very step, which produced it, so "
                                                     "resuming it would stop here again"):
        train(compose_train(*tiny_run_overrides(every_step), "trainer.max_steps=4", "module.optimizer.lr=0.7",
                            "callbacks.periodic_checkpoint.every_n_train_steps=1"))
    fresh = tmp_path / "fresh"
    with pytest.raises(NonFiniteGradientError, match="at step 1 .*No checkpoint was saved before it, so there is "
                                                     "nothing to resume: start a new run with module.optimizer"
                                                     r"\.lr=1e\+09"):
        train(compose_train(*tiny_run_overrides(fresh), "module.optimizer.lr=1e10"))


def test_the_lock_tells_a_killed_run_from_a_running_one_and_the_summary_lists_both(tmp_path: Path) -> None:
    """Case 6: result.json ``running`` with the lock of a dead process reads as ``killed``; a live one is refused."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sweep = tmp_path / "sweep"
    for job, pid in ((0, dead.pid), (1, os.getpid())):
        run_dir = sweep / str(job)
        write_json(run_dir / RESULT_FILE, {"status": "running", "job": job, "overrides": [f"seed={job}"]})
        write_json(run_dir / LOCK_FILE, {"pid": pid, "host": os.uname().nodename})
    write_json(sweep / "2" / RESULT_FILE, {"status": "completed", "job": 2, "best_val_psnr": 30.0})
    write_json(sweep / "2" / ROW_FILE, {"job": 2, "status": "completed", "best_val_psnr": 30.0,
                                        "best_checkpoint": "b.ckpt", "overrides": "seed=2", "run_dir": "x",
                                        "error": ""})
    assert [(row["job"], row["status"]) for row in read_rows(sweep)] == [(0, "killed"), (1, "running"),
                                                                          (2, "completed")]
    assert RunLock(sweep / "0").acquire() is True  # the dead process's lock is replaced
    with pytest.raises(RunDirectoryInUse, match=rf"in use by process {os.getpid()}"):
        RunLock(sweep / "1").acquire()


def test_a_sweep_continued_with_resume_starts_the_jobs_it_never_reached(tmp_path: Path) -> None:
    """The README's way to continue an interrupted sweep: finished jobs keep their result (case 3), killed ones
    resume, and a job that never started has nothing to resume and starts."""
    run_dir = tmp_path / "7"
    with hydra_job(RunMode.MULTIRUN, run_dir, *tiny_run_overrides(run_dir)[1:], "resume=true", job_num=7) as cfg:
        metrics = train(cfg)
    assert metrics["val/psnr_best"] > 0
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert not (run_dir / "config.resume1.yaml").exists()
    assert json.loads((run_dir / RESULT_FILE).read_text())["status"] == "completed"
    with pytest.raises(FileNotFoundError, match="has no checkpoint to continue"):  # outside a sweep: an error
        train(compose_train(*tiny_run_overrides(tmp_path / "single"), "resume=true"))
