"""Evaluate a checkpoint with the paper's test protocol: `python evaluate.py ckpt_path=<our .ckpt>` (the checkpoint
rebuilds its own model) or `python evaluate.py task=derain data=rain13k model=kbnet_l pretrained=<official .pth>`.
Results (Markdown, CSV and JSON per test set, plus a summary) go to outputs/eval/<task>/<run_name>.
`data=demo` (the default) runs without any download. The work happens in ``kbnet.evaluation.evaluate``.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kbnet.cli import hydra_task, run_hydra
from kbnet.evaluation import evaluate

os.environ.setdefault("KBNET_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
@hydra_task
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    run_hydra(main)
