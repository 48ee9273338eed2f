"""RestorationDataModule on generated folders, its spec checks and missing-data message, and every
configs/data/*.yaml instantiated with a minimal task/paths node."""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from omegaconf import OmegaConf

from kbnet.data import TASKS, DatasetNotFoundError, DemoDataModule, RestorationDataModule
from kbnet.imageio import write_image
from tests.helpers import ROOT

CONFIG_DIR = ROOT / "configs" / "data"


def write_pairs(inp: Path, tgt: Path, count: int, size: tuple[int, int] = (20, 24)) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        img = rng.random((*size, 3), dtype=np.float32)
        write_image(inp / f"{i}.png", img)
        write_image(tgt / f"{i}.png", img)


def paired(root: Path, name: str) -> dict:
    return {"kind": "paired", "input_dir": str(root / name / "input"), "target_dir": str(root / name / "target")}


def test_loaders_yield_patch_batches_and_one_loader_per_named_set(tmp_path):
    for name, count in (("train", 5), ("a", 2), ("b", 3)):
        write_pairs(tmp_path / name / "input", tmp_path / name / "target", count)
    dm = RestorationDataModule(train=paired(tmp_path, "train"),
                               val_sets={"B": paired(tmp_path, "b"), "A": paired(tmp_path, "a")},
                               test_sets={"A": paired(tmp_path, "a")},
                               patch_size=16, batch_size=4, train_repeat=2, num_workers=0, pin_memory=False)
    assert dm.val_set_names == ["B", "A"] and dm.test_set_names == ["A"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (4, 3, 16, 16) and len(batch["name"]) == 4
    assert len(dm.train_dataloader()) == 2  # 10 samples per epoch, the last partial batch dropped
    loaders = dm.val_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [3, 2]
    val_batch = next(iter(loaders[0]))
    assert val_batch["input"].shape == (1, 3, 20, 24) and val_batch["name"] == ["0"]
    assert dm.val_input_psnr() == {"B": float("inf"), "A": float("inf")}
    dm.setup("test")
    assert len(dm.test_dataloader()) == 1


def test_workers_are_persistent_only_when_there_are_workers(tmp_path):
    write_pairs(tmp_path / "t" / "input", tmp_path / "t" / "target", 2)
    dm = RestorationDataModule(train=paired(tmp_path, "t"), val_sets={"t": paired(tmp_path, "t")},
                               patch_size=8, batch_size=1, num_workers=2, pin_memory=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers


def test_missing_dataset_explains_layout_preparation_and_demo(tmp_path):
    dm = RestorationDataModule(train=paired(tmp_path, "train/SIDD"), val_sets={},
                               prepare_hint="python data/prepare_sidd.py --src X --dst Y")
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert str(tmp_path / "train/SIDD/input") in message
    assert "Expected layout" in message and str(tmp_path / "train/SIDD/target") in message
    assert "python data/prepare_sidd.py" in message and "data/README.md" in message
    assert "data=demo" in message


@pytest.mark.parametrize(("spec", "match"), [
    ({"kind": "pairs"}, r"train\.kind: expected one of paired"),
    ({"kind": "paired", "input_dir": "a", "target_dir": "b", "inptu": 1}, "unknown key.*inptu"),
    ({"kind": "paired", "input_dir": "a"}, "needs target_dir"),
    ({"kind": "clean", "folder": "a", "only_for_channels": 2}, "only_for_channels"),
    ("a/folder", "expected a mapping"),
])
def test_bad_specs_name_the_key(spec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RestorationDataModule(train=spec, val_sets={})


def test_only_for_channels_selects_benchmarks():
    sets = {"color": {"kind": "gaussian", "folder": "c", "sigma": 25, "only_for_channels": 3},
            "gray": {"kind": "gaussian", "folder": "g", "sigma": 25, "only_for_channels": 1},
            "both": {"kind": "gaussian", "folder": "u", "sigma": 25}}
    train = {"kind": "clean", "folder": "t"}
    assert RestorationDataModule(train, sets, channels=3).val_set_names == ["color", "both"]
    assert RestorationDataModule(train, sets, channels=1).val_set_names == ["gray", "both"]


def test_no_test_sets_and_too_small_training_set(tmp_path):
    write_pairs(tmp_path / "t" / "input", tmp_path / "t" / "target", 2)
    dm = RestorationDataModule(paired(tmp_path, "t"), {}, patch_size=8, batch_size=3, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ValueError, match="fewer than batch_size=3"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="no test sets"):
        dm.test_dataloader()


def compose(config: Path, task: dict, data_dir: Path):
    root = OmegaConf.create({"task": task, "paths": {"data_dir": str(data_dir)}, "data": OmegaConf.load(config)})
    assert root.data.batch_size is None  # train.py passes the per-device batch, derived from global_batch_size
    return hydra.utils.instantiate(root.data, batch_size=8)


CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_every_data_config_is_tested():
    assert {c.stem for c in CONFIGS} == {"demo", "sidd", "rain13k", "dpdd", "gopro", "dfwb"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("task", [{"name": "gaussian_denoise", "channels": 1, "sigma": 15},
                                  {"name": "derain", "channels": 3}], ids=["gauss-gray", "derain"])
def test_data_configs_instantiate(config, task, tmp_path):
    dm = compose(config, task, tmp_path)
    assert dm.val_set_names and dm.test_set_names
    assert dm.batch_size >= 1 and dm.channels == task["channels"]


def test_dfwb_config_picks_benchmarks_per_channels_and_uses_the_task_sigma(tmp_path):
    colour = compose(CONFIG_DIR / "dfwb.yaml", {"name": "gaussian_denoise", "channels": 3, "sigma": 50}, tmp_path)
    gray = compose(CONFIG_DIR / "dfwb.yaml", {"name": "gaussian_denoise", "channels": 1,
                                               "sigma_range": [0, 50]}, tmp_path)
    assert colour.test_set_names == ["CBSD68", "Kodak", "McMaster", "Urban100"]
    assert gray.test_set_names == ["Set12", "BSD68", "Urban100"]
    assert colour.val_specs["CBSD68"]["sigma"] == 50 and gray.val_specs["BSD68"]["sigma"] is None
    assert list(gray.val_specs["BSD68"]["sigma_range"]) == [0, 50]


def test_sidd_config_reads_the_mat_blocks_for_val_and_test(tmp_path):
    dm = compose(CONFIG_DIR / "sidd.yaml", {"name": "real_denoise", "channels": 3}, tmp_path)
    assert dm.val_specs["SIDD"]["kind"] == "sidd_mat" and dm.test_specs["SIDD"] == dm.val_specs["SIDD"]
    with pytest.raises(DatasetNotFoundError, match="prepare_sidd.py"):
        dm.setup("validate")


@pytest.mark.parametrize("task", TASKS)
def test_demo_config_trains_for_every_task(task, tmp_path):
    dm = compose(CONFIG_DIR / "demo.yaml", {"name": task, "channels": 3, "sigma": 25}, tmp_path)
    assert isinstance(dm, DemoDataModule)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (dm.batch_size, 3, dm.patch_size, dm.patch_size)
    assert torch.isfinite(batch["input"]).all()


def test_dataloaders_before_setup_are_an_error():
    dm = DemoDataModule("derain")
    with pytest.raises(RuntimeError, match=r"setup\('validate'\)"):
        dm.val_dataloader()


class _Probe(LightningModule):
    """The smallest module that trains on dict batches and records what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Conv2d(3, 3, 1)
        self.train_inputs: list[torch.Tensor] = []
        self.val_names: list[tuple[int, str]] = []

    def training_step(self, batch, batch_idx):
        self.train_inputs.append(batch["input"].clone())
        return torch.nn.functional.l1_loss(self.net(batch["input"]), batch["target"])

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_names.append((dataloader_idx, batch["name"][0]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit_demo(workers: int) -> _Probe:
    seed_everything(7, workers=True)
    probe = _Probe()
    trainer = Trainer(max_steps=2, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=1)
    trainer.fit(probe, datamodule=DemoDataModule("motion_deblur", batch_size=2, patch_size=16,
                                                 num_workers=workers))
    return probe


def test_lightning_fit_is_reproducible_under_seed_everything():
    first, second = _fit_demo(0), _fit_demo(0)
    assert len(first.train_inputs) == 2
    assert all(torch.equal(a, b) for a, b in zip(first.train_inputs, second.train_inputs, strict=True))
    assert first.val_names == [(0, "chelsea"), (0, "motorcycle")]


def test_lightning_fit_with_workers_is_reproducible_and_workers_differ():
    first, second = _fit_demo(2), _fit_demo(2)
    assert all(torch.equal(a, b) for a, b in zip(first.train_inputs, second.train_inputs, strict=True))
    assert not torch.equal(first.train_inputs[0], first.train_inputs[1])
