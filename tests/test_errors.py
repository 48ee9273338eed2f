"""Every user error is one clear line: the cases of issue #11, run the way a user hits them.

Subprocess tests type the command a user types (``python train.py ...`` from the repository root, the console
scripts as modules) and check the exit status, the first line of the message, that no traceback is printed and
that nothing was written. The many bad config values go through the validator in-process (the subprocess tests
show that the same validator is what ``train.py`` runs).
"""

from __future__ import annotations

import errno
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import CompactHydraException

from kbnet.cli import EXIT_USER_ERROR, describe_hydra_error, user_errors
from kbnet.config_check import EVAL_KEYS, TASK_KEYS, TRAIN_KEYS, check_eval_config, check_known_keys, check_train_config
from kbnet.data.datasets import PairedImageDataset
from kbnet.data.verify import verify_datasets
from kbnet.errors import ConfigError, DataError, UserError
from tests.helpers import ROOT
from tests.helpers.configs import CONFIG_DIR, compose_train


def run_user_command(args: list[str], cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environment.update(PYTHONPATH=str(ROOT), WANDB_MODE="disabled", **env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, first_line: str) -> list[str]:
    """Exit status 2, the message's first line (the ``error:`` line) as expected, no traceback, no Hydra
    "Error executing job" line; returns the message's lines."""
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert lines[errors[0]] == first_line
    return lines[errors[0]:]


# ------------------------------------------------------------------------------------ the validator, in-process
BAD_TRAIN_VALUES = [
    ("trainer.max_steps=abc", "trainer.max_steps='abc': expected an integer >= 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0: expected an integer >= 1"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0: expected an integer number of steps >= 1 (or a "
                                     "fraction of an epoch in (0, 1])"),
    ("trainer.log_every_n_steps=-3", "trainer.log_every_n_steps=-3: expected an integer >= 1"),
    ("trainer.precision=16-mixed", "trainer.precision='16-mixed': float16 is refused on every device (KBNet "
                                   "is not float16-safe); use bf16-mixed or 32-true (allowed: 32-true, 32, "
                                   "bf16-mixed, bf16-true, bf16, 64-true, 64)"),
    ("trainer.precision=16", "trainer.precision=16: float16 is refused on every device (KBNet is not "
                             "float16-safe); use bf16-mixed or 32-true (allowed: 32-true, 32, bf16-mixed, bf16-true, "
                             "bf16, 64-true, 64)"),
    ("trainer.devices=0", "trainer.devices=0: expected auto, -1 (all), a number of devices >= 1, or a list of "
                          "device indices"),
    ("module.optimizer.lr=fast", "module.optimizer.lr='fast': expected a number > 0"),
    ("module.optimizer.lr=0", "module.optimizer.lr=0: expected a number > 0"),
    ("module.optimizer.weight_decay=-1e-4", "module.optimizer.weight_decay=-0.0001: expected a number >= 0"),
    ("module.ema_decay=1.5", "module.ema_decay=1.5: expected a number > 0 and < 1 or null"),
    ("task.sigma=-5", "task.sigma=-5: expected a number >= 0 and <= 255 or null"),
    ("data.batch_size=-1", "data.batch_size=-1: is not a setting: the per-device training batch is "
                           "global_batch_size split over devices x nodes; set global_batch_size instead (and leave "
                           "data.batch_size null)"),
    ("data.patch_size=0", "data.patch_size=0: expected an integer >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1: expected an integer >= 0"),
    ("data.verify=maybe", "data.verify='maybe': expected one of header, full, off"),
    ("global_batch_size=0", "global_batch_size=0: expected an integer >= 1"),
    ("torch_threads=0", "torch_threads=0: expected an integer >= 1 or null"),
    ("seed=-1", "seed=-1: expected an integer in [0, 4294967295]"),
    ("resume=maybe", "resume='maybe': expected true or false"),
    ("init_weights=/no/such/weights.pth", "init_weights='/no/such/weights.pth': no such file"),
]


def test_train_validator_names_key_value_and_range() -> None:
    """Two composed configs carry every bad value (one per key each); all are reported, one line each."""
    seen: set[str] = set()
    batches: list[list[tuple[str, str]]] = [[], []]
    for override, message in BAD_TRAIN_VALUES:
        key = override.split("=")[0]
        batches[key in seen].append((override, message))
        seen.add(key)
    for batch in batches:
        with pytest.raises(ConfigError) as info:
            check_train_config(compose_train(*(override for override, _ in batch)))
        lines = str(info.value).splitlines()
        assert sorted(lines[:-1]) == sorted(message for _, message in batch)
        assert lines[-1] == f"({len(batch)} invalid values)"
        assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working
    with pytest.raises(ConfigError) as info:
        check_train_config(compose_train("trainer.max_steps=abc"))
    assert str(info.value) == "trainer.max_steps='abc': expected an integer >= 1"  # one value: one line


def test_train_validator_checks_sigma_range() -> None:
    cfg = compose_train("task=gaussian_denoise_blind", "task.sigma_range=[30,10]")
    with pytest.raises(ConfigError) as info:
        check_train_config(cfg)
    assert str(info.value) == ("task.sigma_range=[30, 10]: expected null or [low, high] with 0 <= low <= high <= "
                               "255 (0-255 units)")


def test_every_shipped_experiment_passes_the_validator() -> None:
    for experiment in sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")):
        check_train_config(compose_train(f"experiment={experiment}"))


def test_eval_validator_refuses_float16_and_negative_tiles() -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        good = compose(config_name="eval")
        bad = compose(config_name="eval", overrides=["precision=fp16", "tile=-1", "task.sigma=-1"])
    check_eval_config(good)
    with pytest.raises(ConfigError) as info:
        check_eval_config(bad)
    assert str(info.value).splitlines() == [
        "task.sigma=-1: expected a number >= 0 and <= 255 or null",
        "precision='fp16': float16 is refused (KBNet is not float16-safe); use fp32 or bf16",
        "tile=-1: expected an integer >= 0 or null",
        "(3 invalid values)"]


def test_one_key_check_names_the_unknown_and_the_known_keys() -> None:
    """Training and evaluation refuse keys nobody reads with the same check; only where the keys are differs."""
    check_known_keys({"seed": 1, "trainer": {}}, TRAIN_KEYS)
    with pytest.raises(ConfigError) as info:
        check_known_keys({"seed": 1, "max_step": 5, "lr": 1}, TRAIN_KEYS)
    assert str(info.value) == f"unknown top-level config key(s) ['lr', 'max_step']; known: {sorted(TRAIN_KEYS)}"
    with pytest.raises(ConfigError) as info:
        check_known_keys({"tiles": 3}, EVAL_KEYS, where=" in the evaluation config")
    assert str(info.value) == (f"unknown top-level config key(s) ['tiles'] in the evaluation config; known: "
                               f"{sorted(EVAL_KEYS)}")
    with pytest.raises(ConfigError) as info:
        check_known_keys({"name": "derain", "sigmas": 1}, TASK_KEYS, "key(s)", " in the task config (derain)")
    assert str(info.value) == f"unknown key(s) ['sigmas'] in the task config (derain); known: {sorted(TASK_KEYS)}"


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.foo=1", "Could not override 'trainer.foo': Key 'foo' is not in struct (to append to your config "
                      "use +trainer.foo=1)"),
    ("data=nodata", "In 'train': Could not find 'data/nodata'; available options in 'data': demo, dfwb, dpdd, "
                    "gopro, rain13k, sidd"),
    ("trainer.max_steps=[1", "cannot parse the override 'trainer.max_steps=[1': no viable alternative at input "
                             "'[1' (override grammar: https://hydra.cc/docs/advanced/override_grammar/basic)"),
])
def test_hydra_composition_errors_become_one_line(override: str, message: str) -> None:
    with pytest.raises(CompactHydraException) as info:
        compose_train(override)
    assert describe_hydra_error(info.value) == message


def test_console_handler_prints_user_errors_and_keeps_bugs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    @user_errors
    def refuses() -> None:
        raise ConfigError("--size 0: expected a positive number of pixels")

    @user_errors
    def crashes() -> None:
        raise RuntimeError("a bug")

    @user_errors
    def fills_the_disk() -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "restored.png"))
        except OSError as error:  # as torch.save's zip writer does
            raise RuntimeError("PytorchStreamWriter failed writing file") from error

    assert refuses() == EXIT_USER_ERROR  # console scripts run sys.exit(main())
    assert capsys.readouterr().err == "error: --size 0: expected a positive number of pixels\n"
    with pytest.raises(RuntimeError, match="a bug"):
        crashes()
    assert fills_the_disk() == EXIT_USER_ERROR
    assert re.fullmatch(rf"error: could not write {re.escape(str(tmp_path))}/restored.png: the disk is full \(No "
                        r"space left on device; [0-9.]+ (MiB|bytes) free on its file system\); free some space and "
                        r"rerun\n", capsys.readouterr().err)


# ---------------------------------------------------------------------------------------- data verification
def write_png(path: Path, height: int, width: int, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), value, np.uint8))
    return path


def png_with_garbage_pixels(path: Path, height: int, width: int) -> Path:
    """A PNG whose chunks are all intact (valid CRCs) but whose pixel data is not a zlib stream: only decoding
    finds it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"not zlib data" * 10)
                     + chunk(b"IEND", b""))
    return path


def paired_set(root: Path, count: int, size: int = 24) -> tuple[Path, Path]:
    for i in range(count):
        write_png(root / "input" / f"{i:03d}.png", size, size, 100)
        write_png(root / "target" / f"{i:03d}.png", size, size, 120)
    return root / "input", root / "target"


def test_header_check_lists_truncated_corrupt_and_mismatched_files(tmp_path: Path) -> None:
    inputs, targets = paired_set(tmp_path, 30)
    truncated = inputs / "003.png"
    truncated.write_bytes(truncated.read_bytes()[:-20])
    corrupt = targets / "007.png"
    data = bytearray(corrupt.read_bytes())
    data[-20] ^= 0xFF  # inside IDAT (before its CRC and the IEND chunk): the CRC no longer matches
    corrupt.write_bytes(bytes(data))
    write_png(targets / "011.png", 24, 20)
    jpeg = inputs / "015.jpg"
    cv2.imwrite(str(jpeg), np.zeros((24, 24, 3), np.uint8))
    (inputs / "015.png").unlink()
    jpeg.write_bytes(jpeg.read_bytes()[:-10])
    dataset = PairedImageDataset(inputs, targets)
    with pytest.raises(DataError) as info:
        verify_datasets({"train": dataset}, "header")
    lines = str(info.value).splitlines()
    assert lines[0] == "4 problem(s) in the 60 data files of train (data.verify=header); nothing was trained:"
    assert lines[1:5] == [
        f"  {truncated}: truncated PNG (chunk 'IDAT' is cut off)",
        f"  {corrupt}: corrupt PNG (bad CRC in chunk 'IDAT')",
        f"  {inputs / '011.png'} is 24x24 but its target {targets / '011.png'} is 20x24 (width x height)",
        f"  {jpeg}: truncated JPEG (no end-of-image marker)"]
    assert isinstance(info.value, UserError)


def test_full_check_decodes_what_the_header_check_cannot_see(tmp_path: Path) -> None:
    inputs, targets = paired_set(tmp_path, 2)
    png_with_garbage_pixels(inputs / "001.png", 24, 24)
    dataset = PairedImageDataset(inputs, targets)
    assert verify_datasets({"train": dataset}, "header") == 4
    with pytest.raises(DataError, match=r"001.png: cannot decode \(corrupt or unsupported format\)"):
        verify_datasets({"train": dataset}, "full")
    assert verify_datasets({"train": dataset}, "off") == 0


def test_many_bad_files_list_the_first_twenty_and_count_the_rest(tmp_path: Path) -> None:
    inputs, targets = paired_set(tmp_path, 25)
    for path in targets.iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(DataError) as info:
        verify_datasets({"train": PairedImageDataset(inputs, targets)}, "header")
    lines = str(info.value).splitlines()
    assert lines[0].startswith("25 problem(s) in the 50 data files")
    assert len([line for line in lines if "cannot decode" in line]) == 20
    assert "  ... and 5 more" in lines


# ----------------------------------------------------------------------------- the commands a user types
def test_train_refuses_bad_values_before_writing_anything(tmp_path: Path) -> None:
    log_dir = tmp_path / "outputs"
    result = run_user_command(["train.py", f"paths.log_dir={log_dir}", "run_name=first", "trainer.max_steps=abc",
                               "module.optimizer.lr=fast"])
    message = assert_user_error(result, "error: trainer.max_steps='abc': expected an integer >= 1")
    assert message[1:] == ["module.optimizer.lr='fast': expected a number > 0", "(2 invalid values)"]
    assert not log_dir.exists()  # no run directory: the run name is not burnt


def test_hydra_full_error_shows_the_traceback(tmp_path: Path) -> None:
    result = run_user_command(["train.py", f"paths.log_dir={tmp_path / 'outputs'}", "task.sigma=-5"],
                              HYDRA_FULL_ERROR="1")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "kbnet.errors.ConfigError: task.sigma=-5" in result.stderr


def test_train_unknown_key_is_one_line(tmp_path: Path) -> None:
    result = run_user_command(["train.py", f"paths.log_dir={tmp_path / 'outputs'}", "trainer.max_stpes=10"])
    assert_user_error(result, "error: Could not override 'trainer.max_stpes': Key 'max_stpes' is not in struct (to "
                              "append to your config use +trainer.max_stpes=10)")
    assert not (tmp_path / "outputs").exists()


def test_train_lists_bad_data_files_before_step_zero(tmp_path: Path) -> None:
    data_dir, log_dir = tmp_path / "data", tmp_path / "outputs"
    inputs, _ = paired_set(data_dir / "train" / "Rain13K", 40, size=40)
    paired_set(data_dir / "test" / "Rain100L", 2, size=40)
    bad = inputs / "017.png"
    bad.write_bytes(bad.read_bytes()[:30])
    result = run_user_command(["train.py", "task=derain", "model=kbnet_l_tiny", "data=rain13k",
                               f"paths.data_dir={data_dir}", f"paths.log_dir={log_dir}", "data.num_workers=0",
                               "data.patch_size=32", "task.progressive.patch_sizes=[16,16,24,24,32,32]",
                               "global_batch_size=8", "logger=csv"])
    message = assert_user_error(result, "error: 1 problem(s) in the 84 data files of train, validation set Rain100L "
                                        "(data.verify=header); nothing was trained:")
    assert message[1] == f"  {bad}: truncated PNG (chunk 'IHDR' is cut off)"
    assert not log_dir.exists()


def test_evaluate_refuses_float16(tmp_path: Path) -> None:
    result = run_user_command(["evaluate.py", f"paths.log_dir={tmp_path / 'outputs'}", "precision=fp16",
                               "ckpt_path=/no/such.ckpt"])
    message = assert_user_error(result, "error: ckpt_path='/no/such.ckpt': no such file")
    assert message[1:] == ["precision='fp16': float16 is refused (KBNet is not float16-safe); use fp32 or bf16",
                           "(2 invalid values)"]
    assert not (tmp_path / "outputs").exists()


def test_console_scripts_report_one_line(tmp_path: Path) -> None:
    existing = write_png(tmp_path / "out.png", 8, 8)
    before = existing.read_bytes()
    image = write_png(tmp_path / "in" / "a.png", 8, 8)
    result = run_user_command(["-m", "kbnet.restore", str(image), "-o", str(existing), "-c", "/no/such.ckpt"])
    assert_user_error(result, f"error: -o/--output {existing} is an existing file; give a folder for the results "
                              "(it is created if missing)")
    assert existing.read_bytes() == before
    result = run_user_command(["-m", "kbnet.models.summary", "--size", "0"])
    assert_user_error(result, "error: --size 0: the input side must be a positive number of pixels (e.g. 256)")
    result = run_user_command(["-m", "kbnet.metrics.score", str(tmp_path / "none"), str(tmp_path / "in")])
    assert_user_error(result, f"error: image folder not found: {tmp_path / 'none'}")
