"""Hydra multirun and multi-process launches: which combinations compose, and the sweep summary.

* Launch checks: Lightning's ``ddp`` re-runs the command line in each rank, and torchrun/srun start every rank
  with the same command line, so under ``-m`` each rank would run the whole sweep (and the Optuna sampler would
  draw different trials per rank). Those combinations are refused before anything is written, with the ways that
  work: ``strategy=ddp_spawn``, one torchrun per job, or ``launcher=slurm`` where submitit starts the ranks of
  each job. Ranks that torchrun or srun start each resolve ``run_name`` themselves, so it must not depend on time.
* Sweep summary: a Hydra callback writes one row per job (overrides, status, best ``val/psnr``, best checkpoint)
  into ``<sweep dir>/sweep_summary.csv``. Each job leaves its row as a file in its run directory and the table is
  rebuilt from all rows after every job, so it is complete even when a job fails, the sweep is interrupted, or
  the jobs ran on other machines (only the file system is shared).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kbnet.errors import ConfigError
from kbnet.rundir import (
    COMPLETED,
    FAILED,
    INTERRUPTED,
    KILLED,
    RESULT_FILE,
    RUNNING,
    holds_run,
    read_json,
    run_status,
    write_json,
    write_text,
)

log = logging.getLogger(__name__)

ROW_FILE = "sweep_job.json"
SUMMARY_FILE = "sweep_summary.csv"
SUMMARY_COLUMNS = ("job", "status", "best_val_psnr", "best_checkpoint", "overrides", "run_dir", "error")
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
"""Set by torchrun (RANK, LOCAL_RANK, GROUP_RANK), Lightning's ddp re-launch (LOCAL_RANK, NODE_RANK) and SLURM."""

SUPPORTED_WAYS = (
    "Supported ways to combine several processes with a sweep: strategy=ddp_spawn (the ranks are spawned inside "
    "each job), one `torchrun --nproc-per-node=N train.py ...` per job (no -m), or `python train.py -m "
    "launcher=slurm ...` (submitit starts one task per GPU for each job).")


def is_launch_process() -> bool:
    """True in the process that owns the run directory: global rank 0 as far as the launcher's environment tells.

    Lightning's ``ddp`` re-runs the command line for ranks > 0 with ``LOCAL_RANK`` set, torchrun sets ``RANK``,
    multi-node launches set a node rank and SLURM sets ``SLURM_PROCID``; the process the user started has none
    of them, or all zero.
    """
    return all(int(os.environ.get(key, "0")) == 0 for key in RANK_VARIABLES)


def external_launcher() -> str | None:
    """``"torchrun"``, ``"srun"`` or ``"submitit"`` when this process is one of several started outside Lightning."""
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "submitit" if "SUBMITIT_EXECUTOR" in os.environ else "srun"
    return None


def hydra_mode() -> RunMode | None:
    """RUN or MULTIRUN under a Hydra entry point; ``None`` when ``train`` is called directly (tests, notebooks)."""
    return HydraConfig.get().mode if HydraConfig.initialized() else None


def check_sweep_launch(relaunches_script: bool, processes: int) -> None:
    """Refuse the launches that cannot work under Hydra multirun, and ``launcher=slurm`` without ``-m``.

    Args:
        relaunches_script: the strategy starts its other ranks by re-running the command line (Lightning ``ddp``).
        processes: devices x nodes of the trainer.
    """
    mode = hydra_mode()
    if mode == RunMode.MULTIRUN:
        if relaunches_script and processes > 1:
            raise ConfigError(
                "strategy=ddp re-runs the command line in each rank, which under Hydra multirun (-m) restarts the "
                f"whole sweep in every rank (Lightning issue #11300). {SUPPORTED_WAYS}")
        launcher = external_launcher()
        if launcher in ("torchrun", "srun"):
            raise ConfigError(
                f"this sweep (-m) was started by {launcher} in several processes: each would run the whole sweep "
                f"on its own (and an Optuna search would draw different trials per process). {SUPPORTED_WAYS}")
    elif mode == RunMode.RUN and "submitit" in str(HydraConfig.get().launcher.get("_target_", "")):
        raise ConfigError("launcher=slurm submits the jobs of a sweep and needs -m (Hydra runs launchers only in "
                          "multirun mode): `python train.py -m launcher=slurm ...`")


def check_run_name_agreement(cfg: DictConfig) -> None:
    """Ranks started by torchrun or srun resolve ``run_name`` each on their own: a ``${now:...}`` default could
    put them in different run directories (a second passes between their starts; other nodes start later)."""
    launcher = external_launcher()
    raw_name = OmegaConf.to_container(cfg, resolve=False).get("run_name")
    if launcher in ("torchrun", "srun") and "${now:" in str(raw_name):
        raise ConfigError(
            f"this run was started by {launcher} in several processes, which would each resolve "
            f"run_name={raw_name} at their own time and could disagree on the run directory; pass an explicit "
            "run_name (e.g. run_name=sidd_8gpu) so every rank uses the same one")


@dataclass(frozen=True)
class SweepJob:
    """This process's job in a Hydra multirun."""

    sweep_dir: Path
    num: int
    overrides: tuple[str, ...]

    @property
    def wandb_group(self) -> str:
        """One wandb group per sweep, named after the sweep directory."""
        return f"sweep-{self.sweep_dir.name}"

    @property
    def wandb_name(self) -> str:
        """The job within its group: ``<sweep>-<job number>``, the number of its run directory."""
        return f"{self.sweep_dir.name}-{self.num}"


def current_sweep_job() -> SweepJob | None:
    """The multirun job this process runs, or ``None`` outside a multirun."""
    if hydra_mode() != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    return SweepJob(Path(hydra_cfg.sweep.dir), int(hydra_cfg.job.num), tuple(hydra_cfg.overrides.task))


def unstarted_sweep_job(run_dir: Path) -> bool:
    """A sweep continued with ``resume=true`` resumes the jobs it ran; the ones it never reached (no run in their
    directory yet) start from the beginning."""
    if current_sweep_job() is None or holds_run(run_dir):
        return False
    log.warning("resume=true: sweep job in %s never started, so it starts now", run_dir)
    return True


def running_record() -> dict[str, Any]:
    """``result.json`` while a run trains: in a sweep with its job number and overrides, so the summary can list
    a job whose process was killed before it could write its row."""
    job = current_sweep_job()
    return {"status": RUNNING, **({} if job is None else {"job": job.num, "overrides": list(job.overrides)})}


def job_row(job_num: int, overrides: list[str], run_dir: Path, failure: BaseException | None) -> dict[str, Any]:
    """One summary row: what the job was asked (overrides) and what it reached (from its ``result.json``)."""
    result = read_json(run_dir / RESULT_FILE)
    error = ""
    status = COMPLETED
    if failure is not None:
        first_line = next(iter(str(failure).strip().splitlines()), "")
        error = f"{type(failure).__name__}: {first_line}"
        status = INTERRUPTED if result.get("status") == INTERRUPTED else FAILED
    return {
        "job": job_num,
        "status": status,
        "best_val_psnr": result.get("best_val_psnr"),
        "best_checkpoint": result.get("best_checkpoint"),
        "overrides": " ".join(overrides),
        "run_dir": str(run_dir),
        "error": error,
    }


def read_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """The job rows under ``sweep_dir``, sorted by job number.

    A job whose run is going on or was killed (``kbnet.rundir.run_status``: ``running`` or ``killed``) is listed
    with that status, also when no row was written yet or the row is from an earlier attempt.
    """
    rows = {}
    for path in sweep_dir.rglob(RESULT_FILE):
        result = read_json(path)
        if "job" in result:
            rows[path.parent] = {"job": result["job"], "status": run_status(path.parent),
                                 "best_val_psnr": result.get("best_val_psnr"),
                                 "best_checkpoint": result.get("best_checkpoint"),
                                 "overrides": " ".join(result.get("overrides", [])), "run_dir": str(path.parent),
                                 "error": result.get("error", "")}
    for path in sweep_dir.rglob(ROW_FILE):
        row = read_json(path)
        if rows.get(path.parent, {}).get("status") in (RUNNING, KILLED):
            row["status"] = rows[path.parent]["status"]
        rows[path.parent] = row
    return sorted(rows.values(), key=lambda row: row["job"])


def write_summary(sweep_dir: Path) -> Path:
    """Rebuild ``sweep_summary.csv`` from the job rows under ``sweep_dir``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in read_rows(sweep_dir):
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in SUMMARY_COLUMNS})
    path = sweep_dir / SUMMARY_FILE
    write_text(path, buffer.getvalue())
    return path


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table for the log, best ``val/psnr`` first."""
    ranked = sorted(rows, key=lambda row: -(row["best_val_psnr"] if row["best_val_psnr"] is not None else -1e9))
    lines = [f"{'job':>4}  {'status':<9}  {'val/psnr':>8}  overrides"]
    for row in ranked:
        psnr = "-" if row["best_val_psnr"] is None else f"{row['best_val_psnr']:.3f}"
        lines.append(f"{row['job']:>4}  {row['status']:<9}  {psnr:>8}  {row['overrides']}")
    return "\n".join(lines)


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks``) that keeps ``<sweep dir>/sweep_summary.csv`` up to date.

    ``on_job_end`` runs where the job ran (locally or on a cluster node): it saves the job's row in its run
    directory and rebuilds the table. ``on_multirun_end`` runs once on the submitting machine after a sweep whose
    jobs all succeeded, rebuilds the table and logs it. Single runs (no ``-m``) are left alone.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or not is_launch_process():
            return
        # ``return_value`` would re-raise a failed job's exception; the row only needs to name it.
        failure = job_return._return_value if job_return.status == JobStatus.FAILED else None
        run_dir = Path(config.hydra.runtime.output_dir)
        row = job_row(int(config.hydra.job.num), list(job_return.overrides or []), run_dir, failure)
        write_json(run_dir / ROW_FILE, row)
        write_summary(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        path = write_summary(sweep_dir)
        log.info("sweep summary (%s):\n%s", path, format_summary(read_rows(sweep_dir)))
