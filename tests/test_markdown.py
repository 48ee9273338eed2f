"""The one Markdown table writer and the reports written with it: per-image tables, evaluation summaries."""

from __future__ import annotations

import math

import pytest

from kbnet.evaluation.reporting import summary_markdown
from kbnet.markdown import markdown_table
from kbnet.metrics import MetricTable


def test_text_columns_left_numbers_right():
    table = markdown_table(["net", "level", "ms", "×"], [["KBNet_s", "L1", 1.5, "2.00×"], ["KBNet_l", "L2", 12, "-"]],
                           text_columns=2)
    assert table.splitlines() == ["| net | level | ms | × |", "| --- | --- | ---: | ---: |",
                                  "| KBNet_s | L1 | 1.5 | 2.00× |", "| KBNet_l | L2 | 12 | - |"]
    assert markdown_table(["a", "b"], []).splitlines()[1] == "| --- | ---: |"  # one text column by default


def test_a_row_of_another_length_is_refused():
    with pytest.raises(ValueError, match="row 1 has 1 cells, the header 2"):
        markdown_table(["a", "b"], [[1, 2], [3]])


def test_metric_table_markdown_has_left_labels_right_metrics_and_a_bold_mean():
    table = MetricTable(metrics=("psnr", "ssim"), labels=("result", "target"))
    table.add(result="a.png", target="a.png", psnr=30.0, ssim=0.9)
    table.add(result="b.png", target="b.png", psnr=math.inf, ssim=1.0)
    assert table.to_markdown().splitlines() == [
        "| result | target | psnr | ssim |", "| --- | --- | ---: | ---: |",
        "| a.png | a.png | 30.0000 | 0.9000 |", "| b.png | b.png | inf | 1.0000 |",
        "| **mean (2 images)** |  | **inf** | **0.9500** |"]
    assert table.to_markdown().endswith(" |\n")


def test_evaluation_summary_markdown():
    rows = [{"set": "Kodak24", "images": 24, "psnr": 31.123456}, {"set": "CBSD68", "images": 68}]
    text = summary_markdown(rows, ["set", "images", "psnr"], "denoise evaluation: kbnet_s")
    assert text.splitlines() == ["# denoise evaluation: kbnet_s", "", "| set | images | psnr |",
                                 "| --- | ---: | ---: |", "| Kodak24 | 24 | 31.1235 |", "| CBSD68 | 68 |  |"]
    assert text.endswith(" |\n")
