"""One error handler for every entry point: ``train.py``, ``evaluate.py`` and the console scripts.

An expected error (``kbnet.errors.UserError``: a config value, a data file, a checkpoint, a run directory, a full
disk) prints ``error: <message>`` on stderr and exits with status 2, without a traceback; anything else is a bug
and keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows the traceback of every error, as Hydra documents.

Hydra (1.3) needs two hooks because it catches exceptions itself:

* inside the task function (``hydra_task``): Hydra stores a job's exception and prints "Error executing job with
  overrides" before re-raising it, so a user error is reported here and leaves as ``SystemExit(2)``, which Hydra
  does not catch. Under ``-m`` the error is printed and re-raised, so the sweep records the failed job as before;
* around ``hydra.main`` (``run_hydra``): composition errors (unknown override key, missing config group option,
  bad override syntax) are raised before the task runs and would be printed by Hydra with a hint about
  ``HYDRA_FULL_ERROR``. ``run_hydra`` sets that variable while Hydra composes, so those errors reach it and become
  one ``error:`` line; the user's setting is given back as soon as composition is over (``RunDirectoryGuard``,
  or at the latest when the task starts), so jobs, training and its child processes see the environment the user
  gave.

Hydra creates the run directory (and its log file) before the task starts. ``RunDirectoryGuard``, a Hydra
callback, notes which directories did not exist yet; a user error that stops a run before it started (before
its ``config.yaml`` was written) removes them again, so a rejected command leaves no files behind.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kbnet.errors import UserError
from kbnet.rundir import disk_full_error, holds_run

EXIT_USER_ERROR = 2
"""Exit status of an expected error (as argparse uses for a bad command line)."""
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"

F = TypeVar("F", bound=Callable[..., Any])


def full_traceback_requested() -> bool:
    """The user asked for every traceback (Hydra's own switch, read the way Hydra reads it)."""
    return os.environ.get(FULL_ERROR_ENV) == "1"


def as_user_error(error: BaseException) -> UserError | None:
    """The user error behind ``error``, or None for a bug. Hydra wraps errors raised while instantiating a config
    node; a full disk is the user's to fix."""
    if isinstance(error, InstantiationException) and isinstance(error.__cause__, UserError):
        return error.__cause__
    if isinstance(error, UserError):
        return error
    return disk_full_error(error)


def report(message: object) -> None:
    """Print ``error: <message>`` on stderr, after whatever was printed on stdout."""
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def user_errors(main: F) -> F:
    """Decorate a console script's ``main``: a user error becomes one ``error:`` line and the return value 2,
    the exit status of ``sys.exit(main())`` (how console scripts call it)."""
    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except Exception as error:
            user_error = as_user_error(error)
            if user_error is None or full_traceback_requested():
                raise
            report(user_error)
            return EXIT_USER_ERROR
    return wrapper  # type: ignore[return-value]


class _State:
    """What ``run_hydra`` changed and what ``RunDirectoryGuard`` found, for the task wrapper of this process."""

    restore_full_error: ClassVar[bool] = False
    new_paths: ClassVar[list[Path]] = []
    run_dir: ClassVar[Path | None] = None


def _restore_full_error_env() -> None:
    if _State.restore_full_error:
        os.environ.pop(FULL_ERROR_ENV, None)
        _State.restore_full_error = False


def hydra_task(task: F) -> F:
    """Decorate a ``@hydra.main`` task function (below the ``hydra.main`` decorator)."""
    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        _restore_full_error_env()
        try:
            return task(cfg)
        except Exception as error:
            user_error = as_user_error(error)
            if user_error is None or full_traceback_requested():
                raise
            report(user_error)
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise  # the sweep records this job as failed and goes on as it always did
            _remove_unused_run_dir()
            raise SystemExit(EXIT_USER_ERROR) from None
    return wrapper  # type: ignore[return-value]


def describe_hydra_error(error: CompactHydraException) -> str:
    """A Hydra composition error as a message whose first line says what is wrong."""
    if isinstance(error, OverrideParseException):
        reason = str(error).splitlines()[0]
        return (f"cannot parse the override {error.override!r}: {reason} (override grammar: "
                "https://hydra.cc/docs/advanced/override_grammar/basic)")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, MissingConfigException):
        lines = [line for line in lines if not line.startswith(("Config search path", "provider="))]
        head, options = lines[0], lines[1:]
        if options and options[0].startswith("Available options"):
            return f"{head}; {options[0].rstrip(':').lower()}: {', '.join(options[1:])}"
        return "; ".join(lines)
    hints = [line for line in lines[1:] if line.startswith("To append")]
    lines = [line for line in lines if line not in hints]
    if error.__cause__ is not None:
        lines.append(str(error.__cause__).splitlines()[0])
    message = ": ".join(line.rstrip(".") for line in lines)
    return message + "".join(f" ({hint[0].lower()}{hint[1:]})" for hint in hints)


def run_hydra(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function (decorated with ``hydra_task``) with the error handling described above."""
    if not full_traceback_requested():
        os.environ[FULL_ERROR_ENV] = "1"
        _State.restore_full_error = True
    try:
        main()
    except CompactHydraException as error:
        if not _State.restore_full_error:
            raise
        report(describe_hydra_error(error))
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        _restore_full_error_env()


class RunDirectoryGuard(Callback):
    """Notes the run directory (and its parents) that Hydra is about to create for a single run. Composition is
    over when Hydra calls it, so it also gives back the user's ``HYDRA_FULL_ERROR`` setting, before a sweep's
    launcher submits jobs with this process's environment."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _restore_full_error_env()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _restore_full_error_env()
        _State.new_paths, _State.run_dir = [], None
        run_dir = OmegaConf.select(config, "hydra.run.dir", throw_on_resolution_failure=False)
        if run_dir is None:
            return
        path = Path(str(run_dir)).absolute()
        _State.run_dir = path
        while not path.exists() and path != path.parent:
            _State.new_paths.append(path)
            path = path.parent


def _remove_unused_run_dir() -> None:
    """Remove the directories created for this run (by Hydra, or a run id written during the checks) when the run
    never started: its directory holds no ``config.yaml``, the record every started run (or evaluation) writes."""
    if not _State.new_paths or _State.run_dir is None or holds_run(_State.run_dir):
        return
    top = _State.new_paths[-1]
    if not top.is_dir():
        return
    for logger in (logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)):
        for handler in list(getattr(logger, "handlers", [])):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(top):
                handler.close()
                logger.removeHandler(handler)
    shutil.rmtree(top)
