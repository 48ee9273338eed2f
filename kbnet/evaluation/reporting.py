"""Evaluation outputs besides the per-set tables: the summary over all sets, and what the loggers receive."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger

from kbnet.markdown import markdown_table
from kbnet.metrics import MetricTable
from kbnet.metrics.aggregate import check_can_write, format_value, report_paths
from kbnet.rundir import atomic_writer, write_text


def summary_rows(tables: Mapping[str, MetricTable]) -> list[dict[str, Any]]:
    """One row per test set: its name, its image count and the mean of every metric."""
    return [{"set": name, "images": len(table), **table.means()} for name, table in tables.items()]


def summary_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str) -> str:
    """A ``# title`` and one table row per set: the set's name left-aligned, its count and means right-aligned
    (4 decimals; a set without a column gets an empty cell)."""
    cells = [[format_value(row.get(c, ""), 4) for c in columns] for row in rows]
    return f"# {title}\n\n{markdown_table(columns, cells)}\n"


def write_summary(prefix: Path, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any],
                  overwrite: bool = False) -> list[Path]:
    """``<prefix>.csv/.json/.md``: the per-set means (no mean over sets: sets are reported, not averaged)."""
    paths = report_paths(prefix)
    check_can_write(paths, overwrite)
    columns = ["set", "images", *dict.fromkeys(k for row in rows for k in row if k not in ("set", "images"))]
    csv_path, json_path, md_path = paths
    with atomic_writer(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[row.get(c, "") for c in columns] for row in rows])
    json_rows = [{k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()} for row in rows]
    write_text(json_path, json.dumps({**meta, "sets": json_rows}, indent=2, allow_nan=False) + "\n")
    write_text(md_path, summary_markdown(rows, columns, f"{meta.get('task', '')} evaluation: {meta.get('model', '')}"))
    return paths


def log_results(loggers: Sequence[Logger], rows: Sequence[Mapping[str, Any]],
                tables: Mapping[str, MetricTable]) -> None:
    """Means as ``test/<set>/<metric>`` metrics; wandb also gets the summary and per-image tables."""
    metrics = {f"test/{row['set']}/{k}": float(v) for row in rows for k, v in row.items() if k not in ("set",)}
    for logger in loggers:
        logger.log_metrics(metrics, step=0)
        if isinstance(logger, WandbLogger):
            import wandb

            run = logger.experiment
            columns = ["set", "images", *dict.fromkeys(k for row in rows for k in row if k not in ("set", "images"))]
            run.log({"test/results": wandb.Table(columns=columns,
                                                 data=[[row.get(c) for c in columns] for row in rows])})
            for name, table in tables.items():
                image_columns = [*table.labels, *table.metrics]
                run.log({f"test/{name}/images": wandb.Table(columns=image_columns,
                                                            data=[[r[c] for c in image_columns] for r in table.rows])})
            run.summary.update(metrics)
        logger.finalize("success")
