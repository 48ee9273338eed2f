"""Train KBNet: `python train.py` (tiny model on the built-in demo photos) or a paper recipe such as
`python train.py experiment=kbnet_s_sidd`. Any config value can be overridden, e.g. `trainer.max_steps=2000`;
`python train.py --help` lists the config groups. The work happens in ``kbnet.training.train``.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kbnet.cli import hydra_task, run_hydra
from kbnet.training import train

os.environ.setdefault("KBNET_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@hydra_task
def main(cfg: DictConfig) -> float | None:
    """Returns the best validation PSNR of the run: the objective of `hparams_search` sweeps."""
    metrics = train(cfg)
    return metrics.get("val/psnr_best")


if __name__ == "__main__":
    run_hydra(main)
