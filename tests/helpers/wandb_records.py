"""What wandb offline runs actually recorded, read from the run-<id>.wandb file that wandb sync uploads.

That file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each with a 7-byte header
(CRC32, length, type: 1 full, 2 first, 3 middle, 4 last chunk) holding a serialized wandb.proto Record.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK_SIZE = 32768


FILE_HEADER_SIZE = 7


RECORD_HEADER_SIZE = 7


FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    run_id: str
    group: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history_keys: set[str] = field(default_factory=set)
    exit_code: int | None = None


def _records(data: bytes) -> list[bytes]:
    records, chunk, pos = [], b"", FILE_HEADER_SIZE
    while pos + RECORD_HEADER_SIZE <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < RECORD_HEADER_SIZE:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER_SIZE])
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += left_in_block
            continue
        if pos + RECORD_HEADER_SIZE + length > len(data):  # still being written
            break
        chunk += data[pos + RECORD_HEADER_SIZE:pos + RECORD_HEADER_SIZE + length]
        pos += RECORD_HEADER_SIZE + length
        if kind in (FULL, LAST):
            records.append(chunk)
            chunk = b""
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_path: Path, timeout: float = 30.0) -> OfflineRun:
    """The finished run recorded in an ``offline-run-*`` folder.

    wandb-core writes the file from its own process and may still be flushing it when ``wandb.finish`` returns
    (seen with wandb 0.31: the exit record arrives tens of milliseconds later), so wait for the exit record.
    """
    deadline = time.monotonic() + timeout
    while (run := _parse_offline_run(run_path)).exit_code is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return run


def _parse_offline_run(run_path: Path) -> OfflineRun:
    (wandb_file,) = run_path.glob("run-*.wandb")
    run = OfflineRun(run_id=wandb_file.stem.removeprefix("run-"))
    for raw in _records(wandb_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.group, run.name = record.run.run_group, record.run.display_name
            run.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "history":
            run.history_keys.update(_key(i) for i in record.history.item)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run under ``<save_dir>/wandb``, oldest first."""
    return [read_offline_run(path) for path in sorted(wandb_dir.glob("offline-run-*"))]
