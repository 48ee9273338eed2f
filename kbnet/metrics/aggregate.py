"""Per-image metric rows averaged over a set, and their CSV / JSON / Markdown reports.

Papers report the mean of per-image values (PSNR of each image, then averaged), never a PSNR of the MSE pooled
over the whole set; ``mean_metric`` and ``MetricTable`` keep that rule in one place.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kbnet.errors import ExistingFileError
from kbnet.markdown import markdown_table
from kbnet.rundir import atomic_writer, write_text

REPORT_SUFFIXES = (".csv", ".json", ".md")


def mean_metric(values: Iterable[float], name: str = "metric") -> float:
    """Arithmetic mean of per-image values. One ``inf`` PSNR (an identical pair) makes the mean ``inf``."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError(f"cannot average {name}: no values")
    if any(math.isnan(v) for v in vals):
        n_nan = sum(math.isnan(v) for v in vals)
        raise ValueError(f"cannot average {name}: {n_nan} of {len(vals)} values are NaN")
    return math.fsum(vals) / len(vals)


def format_value(value: Any, digits: int) -> str:
    """A table cell: floats with ``digits`` decimals (an identical pair's PSNR as ``inf``), the rest as is."""
    if isinstance(value, float):
        return "inf" if math.isinf(value) and value > 0 else f"{value:.{digits}f}"
    return str(value)


def _json_value(value: Any) -> Any:
    """JSON has no infinity: an identical pair's PSNR is written as the string "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


class MetricTable:
    """Rows of labels (file names...) plus metric values, with per-metric means and report writers."""

    def __init__(self, metrics: Sequence[str], labels: Sequence[str] = ("name",), digits: int = 4,
                 meta: Mapping[str, Any] | None = None) -> None:
        if not metrics:
            raise ValueError("MetricTable needs at least one metric name")
        self.metrics = tuple(metrics)
        self.labels = tuple(labels)
        self.digits = digits
        self.meta = dict(meta or {})
        self.rows: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:
        """Add one image: every label and every metric must be given, nothing else."""
        expected = set(self.labels) | set(self.metrics)
        if set(row) != expected:
            raise ValueError(f"row keys {sorted(row)} differ from the table's columns {sorted(expected)}")
        self.rows.append({**{k: row[k] for k in self.labels}, **{k: float(row[k]) for k in self.metrics}})

    def __len__(self) -> int:
        return len(self.rows)

    def means(self) -> dict[str, float]:
        return {m: mean_metric((r[m] for r in self.rows), m) for m in self.metrics}

    def _mean_row(self) -> dict[str, Any]:
        return {self.labels[0]: f"mean ({len(self.rows)} images)", **{k: "" for k in self.labels[1:]},
                **self.means()}

    def render(self) -> str:
        """Plain-text table, one line per image and a final mean line."""
        columns = (*self.labels, *self.metrics)
        body = [[format_value(r[c], self.digits) for c in columns] for r in [*self.rows, self._mean_row()]]
        widths = [max(len(c), *(len(line[i]) for line in body)) for i, c in enumerate(columns)]
        n_labels = len(self.labels)

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) if i < n_labels else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(columns), rule, *(fmt(line) for line in body[:-1]), rule, fmt(body[-1])])

    def to_markdown(self) -> str:
        """One row per image and a bold mean row; labels left-aligned, metrics right-aligned."""
        columns = (*self.labels, *self.metrics)
        rows = [[format_value(r[c], self.digits) for c in columns] for r in self.rows]
        mean = self._mean_row()
        rows.append([f"**{format_value(mean[c], self.digits)}**" if mean[c] != "" else "" for c in columns])
        return markdown_table(columns, rows, text_columns=len(self.labels)) + "\n"

    def to_json(self) -> str:
        payload = {**self.meta, "count": len(self.rows),
                   "mean": {k: _json_value(v) for k, v in self.means().items()},
                   "images": [{k: _json_value(v) for k, v in r.items()} for r in self.rows]}
        return json.dumps(payload, indent=2, allow_nan=False) + "\n"

    def write_csv(self, path: Path) -> None:
        """Full-precision values (``repr``), one row per image and a last row holding the means."""
        with atomic_writer(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*self.labels, *self.metrics])
            for r in [*self.rows, self._mean_row()]:
                writer.writerow([r[c] for c in (*self.labels, *self.metrics)])

    def write_reports(self, prefix: str | Path, overwrite: bool = False) -> list[Path]:
        """Write ``<prefix>.csv``, ``.json`` and ``.md`` (see ``report_paths``); refuses before writing any if
        one exists, unless ``overwrite``."""
        paths = report_paths(prefix)
        check_can_write(paths, overwrite)
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        csv_path, json_path, md_path = paths
        self.write_csv(csv_path)
        write_text(json_path, self.to_json())
        write_text(md_path, self.to_markdown())
        return paths


def report_paths(prefix: str | Path) -> list[Path]:
    """The CSV, JSON and Markdown paths for a prefix; a prefix ending in one of those suffixes has it dropped,
    so ``results.csv`` and ``results`` name the same three files."""
    prefix = Path(prefix)
    if prefix.suffix.lower() in REPORT_SUFFIXES:
        prefix = prefix.with_suffix("")
    return [prefix.with_name(prefix.name + s) for s in REPORT_SUFFIXES]


def check_can_write(paths: Sequence[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise ExistingFileError(f"refusing to overwrite existing report file(s): {', '.join(existing)} "
                                "(pass overwrite=True / --overwrite)")
