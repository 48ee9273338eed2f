"""One validator for what a user sets: the keys (a key nobody reads is refused, so a typo in an experiment file is
never silently ignored) and the types and ranges of ``trainer``, ``data``, ``module``, ``task`` and the top-level
values, checked before anything is written (no run directory is claimed, no run name is burnt by a typo).

Each rule names a dotted key and what it accepts; a key that is absent is not checked (an experiment may leave a
group out), a present key must fit. Every bad value is reported at once, one line each: the key, the value found
and the allowed range. Checks that need more than one value and the built objects (the global batch split over
devices, the progressive table against ``data.patch_size``) stay next to the code that uses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from kbnet.errors import ConfigError

Check = Callable[[Any], str | None]
"""Returns None when the value fits, else why not (e.g. "expected an integer >= 1")."""

TRAIN_KEYS = frozenset({"run_name", "resume", "seed", "global_batch_size", "init_weights", "torch_threads",
                        "compile", "paths", "task", "model", "data", "module", "trainer", "logger", "callbacks"})
EVAL_KEYS = frozenset({"run_name", "ckpt_path", "pretrained", "weights", "device", "precision", "self_ensemble",
                       "tile", "tile_overlap", "save_images", "overwrite", "sets", "torch_threads", "paths", "task",
                       "model", "data", "logger"})
"""The top-level keys that ``train`` and ``evaluate`` read."""
TASK_KEYS = frozenset({"name", "channels", "sigma", "sigma_range", "lit_module", "progressive"})
FLOAT16_PRECISIONS = frozenset({"16", "16-mixed", "16-true", "float16", "half", "fp16"})
TRAIN_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "bf16", "64-true", "64")
EVAL_PRECISIONS = ("fp32", "bf16")
VERIFY_MODES = ("header", "full", "off")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int | None = None, high: int | None = None, nullable: bool = False) -> Check:
    bounds = (f" >= {low}" if high is None else f" in [{low}, {high}]") if low is not None else ""
    what = f"expected an integer{bounds}" + (" or null" if nullable else "")

    def check(value: Any) -> str | None:
        if value is None and nullable:
            return None
        ok = _is_int(value) and (low is None or value >= low) and (high is None or value <= high)
        return None if ok else what
    return check


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           nullable: bool = False) -> Check:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    what = "expected a number" + (" " + " and ".join(parts) if parts else "") + (" or null" if nullable else "")

    def check(value: Any) -> str | None:
        if value is None and nullable:
            return None
        if not _is_number(value):
            return what
        if low is not None and (value <= low if low_open else value < low):
            return what
        if high is not None and (value >= high if high_open else value > high):
            return what
        return None
    return check


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "expected true or false"


def choice(options: Sequence[Any], nullable: bool = False) -> Check:
    what = "expected one of " + ", ".join(map(str, options)) + (" or null" if nullable else "")

    def check(value: Any) -> str | None:
        return None if (value is None and nullable) or value in options else what
    return check


def name(value: Any) -> str | None:
    return None if (isinstance(value, str) and value.strip()) or _is_int(value) else "expected a non-empty name"


def existing_file(nullable: bool = True) -> Check:
    def check(value: Any) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value:
            return "expected the path of an existing file" + (" or null" if nullable else "")
        return None if Path(value).is_file() else "no such file"
    return check


def list_of(item: Check, length: int | None = None, nullable: bool = False) -> Check:
    """A non-empty list (of ``length`` values when given) whose every value passes ``item``."""
    what = f"expected a list of {length if length is not None else 'one or more'} values, each {item(None)[9:]}"
    what += " (or null)" if nullable else ""

    def check(value: Any) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, list | tuple | ListConfig) or not value:
            return what
        if length is not None and len(value) != length:
            return what
        return None if all(item(v) is None for v in value) else what
    return check


def sigma_range(value: Any) -> str | None:
    if value is None:
        return None
    what = "expected null or [low, high] with 0 <= low <= high <= 255 (0-255 units)"
    if not isinstance(value, list | tuple | ListConfig) or len(value) != 2 or not all(map(_is_number, value)):
        return what
    return None if 0 <= value[0] <= value[1] <= 255 else what


def interval(value: Any) -> str | None:
    """Lightning's ``val_check_interval``: a number of steps, or a fraction of an epoch."""
    if (_is_int(value) and value >= 1) or (isinstance(value, float) and 0 < value <= 1):
        return None
    return "expected an integer number of steps >= 1 (or a fraction of an epoch in (0, 1])"


def batch_limit(value: Any) -> str | None:
    if value is None or (_is_int(value) and value >= 0) or (isinstance(value, float) and 0 <= value <= 1):
        return None
    return "expected null, an integer number of batches >= 0 or a fraction in [0, 1]"


def devices(value: Any) -> str | None:
    if value == "auto" or (_is_int(value) and (value >= 1 or value == -1)):
        return None
    if isinstance(value, list | ListConfig) and value and all(_is_int(v) and v >= 0 for v in value):
        return None
    if isinstance(value, str) and value.replace(",", "").replace(" ", "").isdigit():
        return None
    return "expected auto, -1 (all), a number of devices >= 1, or a list of device indices"


def train_precision(value: Any) -> str | None:
    if str(value) in FLOAT16_PRECISIONS:
        return ("float16 is refused on every device (KBNet is not float16-safe); use bf16-mixed or 32-true "
                "(allowed: " + ", ".join(TRAIN_PRECISIONS) + ")")
    return None if str(value) in TRAIN_PRECISIONS else "expected one of " + ", ".join(TRAIN_PRECISIONS)


def eval_precision(value: Any) -> str | None:
    if str(value) in FLOAT16_PRECISIONS:
        return "float16 is refused (KBNet is not float16-safe); use fp32 or bf16"
    return None if value in EVAL_PRECISIONS else "expected one of " + ", ".join(EVAL_PRECISIONS)


def derived_batch(value: Any) -> str | None:
    return None if value is None else (
        "is not a setting: the per-device training batch is global_batch_size split over devices x nodes; set "
        "global_batch_size instead (and leave data.batch_size null)")


POSITIVE_INT = integer(1)
COMMON_RULES: dict[str, Check] = {
    "torch_threads": integer(1, nullable=True),
    "paths.root_dir": name,
    "paths.data_dir": name,
    "paths.log_dir": name,
    "task.name": name,
    "task.channels": choice((1, 3)),
    "task.sigma": number(0, 255, nullable=True),
    "task.sigma_range": sigma_range,
    "data.channels": choice((1, 3)),
    "data.sigma": number(0, 255, nullable=True),
    "data.sigma_range": sigma_range,
    "data.batch_size": derived_batch,
    "data.patch_size": POSITIVE_INT,
    "data.num_workers": integer(0),
    "data.train_repeat": POSITIVE_INT,
    "data.train_size": integer(16),
    "data.val_size": integer(16),
    "data.seed": integer(0),
    "data.geometric_augs": boolean,
    "data.pin_memory": boolean,
    "data.verify": choice(VERIFY_MODES),
}
TRAIN_RULES: dict[str, Check] = {
    **COMMON_RULES,
    "run_name": name,
    "resume": boolean,
    "seed": integer(0, 2**32 - 1),
    "global_batch_size": POSITIVE_INT,
    "init_weights": existing_file(),
    "trainer.max_steps": POSITIVE_INT,
    "trainer.max_epochs": integer(-1),
    "trainer.val_check_interval": interval,
    "trainer.log_every_n_steps": POSITIVE_INT,
    "trainer.precision": train_precision,
    "trainer.devices": devices,
    "trainer.num_nodes": POSITIVE_INT,
    "trainer.accumulate_grad_batches": POSITIVE_INT,
    "trainer.gradient_clip_val": number(0, nullable=True),
    "trainer.gradient_clip_algorithm": choice(("norm", "value"), nullable=True),
    "trainer.limit_train_batches": batch_limit,
    "trainer.limit_val_batches": batch_limit,
    "trainer.num_sanity_val_steps": integer(-1),
    "trainer.enable_progress_bar": boolean,
    "trainer.deterministic": choice((True, False, "warn")),
    "trainer.benchmark": choice((True, False), nullable=True),
    "task.progressive.iters": list_of(POSITIVE_INT),
    "task.progressive.patch_sizes": list_of(POSITIVE_INT),
    "task.progressive.batch_sizes": list_of(POSITIVE_INT),
    "task.lit_module.mixup_prob": number(0, 1),
    "task.lit_module.mixup_beta": number(0, low_open=True),
    "module.optimizer.lr": number(0, low_open=True),
    "module.optimizer.weight_decay": number(0),
    "module.optimizer.betas": list_of(number(0, 1, high_open=True), length=2),
    "module.optimizer.eps": number(0, low_open=True),
    "module.lr_schedule.periods": list_of(POSITIVE_INT),
    "module.lr_schedule.eta_mins": list_of(number(0)),
    "module.ema_decay": number(0, 1, low_open=True, high_open=True, nullable=True),
    "module.val_pad_multiple": POSITIVE_INT,
}
EVAL_RULES: dict[str, Check] = {
    **COMMON_RULES,
    "run_name": name,
    "ckpt_path": existing_file(),
    "pretrained": existing_file(),
    "device": lambda v: None if isinstance(v, str) and (v in ("auto", "cpu", "cuda") or v.startswith("cuda:"))
    else "expected auto, cpu, cuda or cuda:N",
    "precision": eval_precision,
    "self_ensemble": boolean,
    "tile": integer(0, nullable=True),
    "tile_overlap": integer(0, nullable=True),
    "save_images": boolean,
    "overwrite": boolean,
    "sets": list_of(name, nullable=True),
}


_ABSENT = object()


def _lookup(cfg: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key, or ``_ABSENT``."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _interpolated(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    return isinstance(value, list) and any(_interpolated(v) for v in value)


def problems(cfg: DictConfig | Mapping[str, Any], rules: Mapping[str, Check]) -> list[str]:
    """One line per bad value: ``key=value: why``. Interpolated values (``${...}``) are skipped: their source
    key is checked itself (``data.sigma`` follows ``task.sigma``)."""
    values = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    found = []
    for key, check in rules.items():
        value = _lookup(values, key)
        if value is _ABSENT or _interpolated(value):
            continue
        if (expected := check(value)) is not None:
            found.append(f"{key}={value!r}: {expected}")
    return found


def _raise(found: list[str]) -> None:
    if found:
        more = f"\n({len(found)} invalid values)" if len(found) > 1 else ""
        raise ConfigError("\n".join(found) + more)


def check_train_config(cfg: DictConfig) -> None:
    """Refuse a training config with a value of the wrong type or outside its range (all of them listed)."""
    _raise(problems(cfg, TRAIN_RULES))


def check_eval_config(cfg: DictConfig) -> None:
    """Refuse an evaluation config with a value of the wrong type or outside its range (all of them listed)."""
    _raise(problems(cfg, EVAL_RULES))


def check_known_keys(node: Mapping[str, Any], known: frozenset[str], keys: str = "top-level config key(s)",
                     where: str = "") -> None:
    """Refuse keys of ``node`` outside ``known``; the message reads "unknown <keys> [...]<where>; known: [...]"."""
    unknown = sorted(set(node) - known)
    if unknown:
        raise ConfigError(f"unknown {keys} {unknown}{where}; known: {sorted(known)}")
