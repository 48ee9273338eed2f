"""The run directory: files that survive any fault (atomic writes, the run lock, the run's status) and the rules
that keep one run per directory, shared by training and evaluation.

* Every file a run writes (checkpoints, ``result.json``, ``config*.yaml``) goes to a temporary file in the
  target's own directory, is flushed and fsynced, and is renamed over the target. A rename within one file system
  is atomic, so a kill, a full disk or a crash leaves the previous file intact and never a truncated file under a
  real name (a temporary in ``$TMPDIR`` would have to be *copied* when ``$TMPDIR`` is another file system, and a
  kill during that copy truncates the target).
* A failed write raises ``DiskWriteError`` naming the path and the free space left; the half-written temporary is
  removed. Temporaries of a killed process cannot be removed by it: the next start of the run cleans them.
* ``run.lock`` holds the process id and host of the run that owns the directory. The next start tells a run that
  was killed (lock of a dead process, ``result.json`` still ``running``) from one that is still going.
* ``config.yaml`` is written once a run's (or an evaluation's) checks passed: a directory holding it holds a run,
  which a new run never reuses; a resume keeps it and adds ``config.resume<N>.yaml``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kbnet.errors import ExistingFileError, MissingFileError, UserError

log = logging.getLogger(__name__)

TEMP_MARKER = ".kbnet-tmp-"
"""Temporary files are named ``.<target name>.kbnet-tmp-<random>``, so leftovers are recognised by name."""
CONFIG_FILE = "config.yaml"
"""The resolved config of the run; its presence marks a directory that holds a run (or an evaluation)."""
LOCK_FILE = "run.lock"
RESULT_FILE = "result.json"
RUNNING, COMPLETED, FAILED, INTERRUPTED, KILLED = "running", "completed", "failed", "interrupted", "killed"


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskWriteError(UserError, OSError):
    """A file of the run could not be written (full disk, quota, permissions, a failing device)."""


class RunDirectoryInUse(UserError):
    """Another live process owns the run directory."""


def free_space(path: Path) -> str:
    """Free space of the file system holding ``path`` (or its nearest existing parent), for error messages."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            free = shutil.disk_usage(candidate).free
            return f"{free / 2**20:.1f} MiB free" if free >= 2**20 else f"{free} bytes free"
    return "free space unknown"


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (a crash of the machine right after it keeps the new name)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb", newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it is fsynced and renamed over ``path``.

    On any error the temporary is removed and ``path`` keeps its previous content; an ``OSError`` becomes a
    ``DiskWriteError`` that names the path and the free space.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARKER}{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, newline=newline) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = _os_error(error)
        if cause is not None and not isinstance(error, DiskWriteError):
            raise DiskWriteError(
                f"could not write {path}: {_write_failure(cause, path.parent)}; the previous version of the file, "
                "if any, is intact. Free some space (or write elsewhere with paths.log_dir=...) and resume with "
                "resume=true") from error
        raise


def _write_failure(cause: OSError, directory: Path) -> str:
    reason = "the disk is full" if cause.errno in DISK_FULL_ERRNOS else "the write failed"
    return f"{reason} ({cause.strerror or cause}; {free_space(directory)} on its file system)"


def disk_full_error(error: BaseException) -> DiskWriteError | None:
    """A full disk or quota behind ``error`` (raised by any write, not only ``atomic_writer``'s) as the user error
    that names the file and the free space; None for any other error."""
    cause = _os_error(error)
    if cause is None or cause.errno not in DISK_FULL_ERRNOS:
        return None
    where = Path(cause.filename) if cause.filename else Path.cwd()
    return DiskWriteError(f"could not write {where}: {_write_failure(cause, where.parent)}; free some space and rerun")


def _os_error(error: BaseException) -> OSError | None:
    """The ``OSError`` behind ``error``: itself, or one it was raised from or during (``torch.save``'s zip writer
    turns a failed write into a ``RuntimeError`` raised while handling the ``OSError``)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (see ``atomic_writer``)."""
    with atomic_writer(path, "w") as file:
        file.write(text)


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` by ``data`` as indented JSON, atomically: readers never see half a file."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when the file does not exist."""
    return json.loads(path.read_text()) if path.is_file() else {}


def clean_temporaries(directory: Path) -> list[Path]:
    """Remove the temporaries that killed writes left anywhere under ``directory``; returns what was removed."""
    removed = sorted(p for p in directory.rglob(f".*{TEMP_MARKER}*") if p.is_file())
    for path in removed:
        log.warning("removing %s (%d bytes): the temporary of a write that was killed before it completed",
                    path, path.stat().st_size)
        path.unlink()
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def lock_holder(run_dir: Path) -> dict[str, Any] | None:
    """The ``run.lock`` content (``pid``, ``host``) when a live process on this host holds it, else ``None``.

    A lock from another host is taken as alive: its process cannot be checked from here.
    """
    lock = read_json(run_dir / LOCK_FILE)
    if not lock:
        return None
    if lock.get("host") != socket.gethostname():
        return lock
    return lock if _process_alive(int(lock["pid"])) else None


def run_status(run_dir: Path) -> str | None:
    """The run's status as ``result.json`` says, with ``running`` turned into ``killed`` when the process that
    wrote it is gone (its lock is stale or missing); ``None`` when the run never wrote a result."""
    status = read_json(run_dir / RESULT_FILE).get("status")
    if status == RUNNING and lock_holder(run_dir) is None:
        return KILLED
    return status


class RunLock:
    """``run.lock`` in a run directory: taken by the process that trains there, released when it ends.

    ``acquire`` refuses a directory whose lock a live process holds, and reports whether the previous owner died
    without releasing it (a kill -9, an out-of-memory kill, a lost node).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.held = False

    def acquire(self) -> bool:
        """Take the lock; returns ``True`` when a stale lock of a dead process was found (and replaced)."""
        holder = lock_holder(self.path.parent)
        if holder is not None:
            raise RunDirectoryInUse(
                f"run directory {self.path.parent} is in use by process {holder['pid']} on {holder['host']} "
                f"({self.path}); wait for it to end, stop it, or choose another run_name. If that process is "
                "gone (e.g. its node was lost), delete the lock file")
        stale = self.path.is_file()
        write_json(self.path, {"pid": os.getpid(), "host": socket.gethostname()})
        self.held = True
        return stale

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False


def record_outcome(run_dir: Path, result: Mapping[str, Any]) -> None:
    """Write ``result.json`` after a failure without letting a failing write (often the same full disk) hide the
    error that ended the run: that write's own error is logged and swallowed."""
    try:
        write_json(run_dir / RESULT_FILE, result)
    except OSError as error:
        log.error("could not record the run's outcome (%s) in %s: %s", result.get("status"), run_dir / RESULT_FILE,
                  error)


def failure_status(error: BaseException) -> str:
    """``interrupted`` for Ctrl-C and a scheduler's SIGTERM, ``failed`` for everything else.

    Lightning turns a Ctrl-C during ``fit`` into ``SystemExit(1)`` after its graceful shutdown, and a SIGTERM into
    ``SIGTERMException``, a ``SystemExit`` too.
    """
    return INTERRUPTED if isinstance(error, KeyboardInterrupt | SystemExit) else FAILED


def checkpoint_step(path: Path) -> int:
    """The ``global_step`` saved in a Lightning checkpoint (memory-mapped: the tensors are not read)."""
    from kbnet.models import read_checkpoint

    return int(read_checkpoint(path)["global_step"])


def completed_result(run_dir: Path, last_ckpt: Path, max_steps: int) -> dict[str, Any] | None:
    """The recorded result of a completed run that a resume with ``max_steps`` would not extend, else ``None``.

    Resuming a completed run (how an interrupted sweep is continued) keeps its ``result.json``; only a raised
    ``trainer.max_steps`` continues its training.
    """
    result = read_json(run_dir / RESULT_FILE)
    if result.get("status") != COMPLETED:
        return None
    step = checkpoint_step(last_ckpt)
    if max_steps > step:
        log.warning("run %s completed %d steps; trainer.max_steps=%d continues it (recorded in its "
                    "config.resume<N>.yaml)", run_dir, step, max_steps)
        return None
    log.info("run %s is complete (%d of trainer.max_steps=%d steps): its result is kept; raise trainer.max_steps "
             "to train it further", run_dir, step, max_steps)
    return result


def holds_run(directory: Path) -> bool:
    """Whether a run (or an evaluation) started in ``directory``: its checks passed and it saved its config."""
    return (directory / CONFIG_FILE).exists()


def check_run_dir(run_dir: Path, resume: bool, last_ckpt: Path | None) -> None:
    """A new run never lands in a started run's directory; a resume needs something to resume."""
    if resume:
        if last_ckpt is None or not last_ckpt.is_file():
            raise MissingFileError(
                f"resume=true but {last_ckpt} does not exist: the run in {run_dir} has no checkpoint to continue "
                "(it may have stopped before its first checkpoint). Start a new run with another run_name.")
    elif holds_run(run_dir):
        raise ExistingFileError(
            f"run directory {run_dir} already holds a run ({CONFIG_FILE} exists). Pass resume=true to continue it "
            "or choose another run_name; nothing in it is overwritten.")


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """An evaluation replaces an earlier one's results only when asked to."""
    if holds_run(out_dir) and not overwrite:
        raise ExistingFileError(f"{out_dir} already holds an evaluation ({CONFIG_FILE} exists); choose another "
                                "run_name or pass overwrite=true to replace its results")


def save_run_config(cfg: DictConfig, run_dir: Path, resume: bool) -> Path:
    """Save the resolved config (and the command-line overrides); a resume adds ``config.resume<N>.yaml``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    if resume:
        n = 1
        while (path := run_dir / f"config.resume{n}.yaml").exists():
            n += 1
        original = OmegaConf.load(run_dir / CONFIG_FILE) if holds_run(run_dir) else None
        if original is not None:
            changed = _changed_keys(OmegaConf.to_container(original), OmegaConf.to_container(cfg))
            changed = [k for k in changed if k != "resume"]
            if changed:
                log.warning("resuming with a config that differs from %s in: %s", CONFIG_FILE, ", ".join(changed))
    write_text(path, OmegaConf.to_yaml(cfg))
    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
        write_text(path.with_name(path.stem + ".overrides.txt"), "\n".join(overrides) + "\n")
    return path


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def claim_run_dir(lock: RunLock, cfg: DictConfig, record: Mapping[str, Any]) -> Path:
    """Mark the run directory as this run's once every check passed: take its lock, remove what killed writes
    left, save the config and ``record`` as ``result.json``; returns the saved config's path."""
    run_dir = lock.path.parent
    if lock.acquire():
        log.warning("the previous process in %s was killed (its lock was never released)", run_dir)
    clean_temporaries(run_dir)
    config_path = save_run_config(cfg, run_dir, cfg.resume)
    write_json(run_dir / RESULT_FILE, record)
    return config_path
