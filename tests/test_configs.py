"""The Hydra config tree: every group option composes and instantiates; recipes carry the paper's numbers."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from omegaconf import OmegaConf

from kbnet.builders import build_callbacks, build_loggers, build_module, check_launch, per_device_batch, resolve_config
from kbnet.lit import DeblurModule, DenoiseModule, DerainModule, GaussianDenoiseModule
from kbnet.models.kbnet_l import KBBlockL
from kbnet.models.kbnet_s import KBBlockS
from kbnet.models.summary import count_parameters
from kbnet.tracking import WANDB_ID_FILE, evaluation_wandb_spec
from tests.helpers.configs import CONFIG_DIR, compose_train, training_loggers

TASKS = {
    "gaussian_denoise": (GaussianDenoiseModule, 3),
    "gaussian_denoise_gray": (GaussianDenoiseModule, 1),
    "gaussian_denoise_blind": (GaussianDenoiseModule, 3),
    "real_denoise": (DenoiseModule, 3),
    "derain": (DerainModule, 3),
    "defocus_deblur": (DeblurModule, 3),
    "motion_deblur": (DeblurModule, 3),
}
MODELS = ["kbnet_s", "kbnet_s_sidd", "kbnet_l", "kbnet_s_tiny", "kbnet_l_tiny"]
EXPERIMENTS = {  # experiment and its overrides: (task, model preset, data module's first validation set)
    "kbnet_s_gauss_color": ("gaussian_denoise", "kbnet_s", "CBSD68"),
    "kbnet_s_gauss_color task.sigma=15": ("gaussian_denoise", "kbnet_s", "CBSD68"),
    "kbnet_s_gauss_color task.sigma=50": ("gaussian_denoise", "kbnet_s", "CBSD68"),
    "kbnet_s_gauss_gray": ("gaussian_denoise", "kbnet_s", "BSD68"),
    "kbnet_s_gauss_gray task.sigma=15": ("gaussian_denoise", "kbnet_s", "BSD68"),
    "kbnet_s_gauss_gray task.sigma=50": ("gaussian_denoise", "kbnet_s", "BSD68"),
    "kbnet_s_sidd": ("real_denoise", "kbnet_s_sidd", "SIDD"),
    "kbnet_l_rain13k": ("derain", "kbnet_l", "Rain100L"),
    "kbnet_l_dpdd": ("defocus_deblur", "kbnet_l", "DPDD"),
    "kbnet_l_gopro": ("motion_deblur", "kbnet_l", "GoPro"),
}
DENOISE_TABLE = {"iters": [92000, 64000, 48000, 36000, 36000, 24000], "patch_sizes": [128, 160, 192, 256, 320, 384],
                 "batch_sizes": [8, 5, 3, 2, 1, 1]}
RESTORE_TABLE = {**DENOISE_TABLE, "patch_sizes": [128, 160, 192, 256, 320, 320], "batch_sizes": [8, 5, 3, 1, 1, 1]}


def input_channels(net: torch.nn.Module) -> int:
    return net.intro.in_channels if hasattr(net, "intro") else net.patch_embed.proj.in_channels


@functools.cache
def meta_backbone(model_yaml: str) -> torch.nn.Module:
    """The backbone of a resolved model config on the meta device (no memory), built once per config."""
    with torch.device("meta"):
        return instantiate(OmegaConf.create(model_yaml))


def build_parts(cfg, batch_size: int = 8):
    """The backbone, the task module and the data module, as train() builds them."""
    net = meta_backbone(OmegaConf.to_yaml(cfg.model))
    return net, build_module(cfg, net), instantiate(cfg.data, batch_size=batch_size)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("model", MODELS)
def test_every_task_and_model_composes_and_instantiates(task: str, model: str, tmp_path: Path) -> None:
    cfg = resolve_config(compose_train(f"task={task}", f"model={model}", f"paths.output_dir={tmp_path}",
                                       "trainer.accelerator=cpu"))
    net, module, datamodule = build_parts(cfg)
    module_cls, channels = TASKS[task]
    assert type(module) is module_cls
    assert input_channels(net) == channels == cfg.data.channels
    assert cfg.model.name == model and module.hparams.net_config["name"] == model
    assert datamodule.val_set_names == ["demo"]


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_paper_recipes_compose_with_the_full_schedule(experiment: str, tmp_path: Path) -> None:
    task, model, val_set = EXPERIMENTS[experiment]
    name, *overrides = experiment.split()
    cfg = resolve_config(compose_train(f"experiment={name}", *overrides, f"paths.output_dir={tmp_path}",
                                       "trainer.accelerator=cpu"))
    net, module, datamodule = build_parts(cfg)
    trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=False)
    assert isinstance(trainer, L.Trainer)
    assert (cfg.task.name, cfg.model.name, datamodule.val_set_names[0]) == (task, model, val_set)
    assert trainer.max_steps == 300_000 and cfg.trainer.val_check_interval == 4000
    assert trainer.gradient_clip_val == 0.01 and trainer.gradient_clip_algorithm == "norm"
    assert cfg.global_batch_size == 64 and cfg.data.patch_size == 384
    assert cfg.module.optimizer == {"_target_": "torch.optim.AdamW", "lr": 3e-4, "weight_decay": 1e-4,
                                    "betas": [0.9, 0.999], "fused": True}
    assert cfg.module.lr_schedule == {"periods": [92000, 208000], "eta_mins": [3e-4, 1e-6]}
    assert cfg.module.loss == "l1" and cfg.module.ema_decay is None and cfg.seed == 100
    assert cfg.torch_threads is None
    denoising = task.endswith("denoise")
    assert dict(cfg.task.progressive) == (DENOISE_TABLE if denoising else RESTORE_TABLE)
    assert module.hparams.get("mixup_prob", 0.0) == (0.5 if denoising else 0.0)
    if name.startswith("kbnet_s_gauss"):
        assert cfg.task.sigma == (int(overrides[0].split("=")[1]) if overrides else 25)
        assert input_channels(net) == (1 if "gray" in name else 3)
    if model == "kbnet_s_sidd":
        assert round(count_parameters(net) / 1e6, 2) == 128.40  # lightweight blocks, FFN 1.5


def test_default_run_is_the_cpu_demo(tmp_path: Path) -> None:
    cfg = resolve_config(compose_train(f"paths.output_dir={tmp_path}"))
    assert cfg.model.name == "kbnet_s_tiny" and cfg.data._target_ == "kbnet.data.DemoDataModule"
    assert cfg.task.name == "gaussian_denoise" and cfg.task.sigma == 25
    assert list(cfg.logger) == ["wandb", "csv"] and cfg.logger.wandb.offline
    assert cfg.trainer.max_steps == 1200 and cfg.global_batch_size == 8 and cfg.torch_threads == 1
    assert cfg.data.val_size >= 256 and "denoising_baseline" in cfg.callbacks
    assert max(cfg.task.progressive.patch_sizes) == cfg.data.patch_size


def test_strategies_build_distributed_trainers(tmp_path: Path) -> None:
    for name in ("ddp", "ddp_spawn"):
        cfg = resolve_config(compose_train(f"strategy={name}", "trainer.accelerator=cpu", "trainer.devices=2",
                                           f"paths.output_dir={tmp_path}"))
        trainer = instantiate(cfg.trainer, logger=False)
        assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
        assert trainer.strategy._start_method == ("spawn" if name == "ddp_spawn" else "popen")
        assert per_device_batch(64, trainer) == 32
    cfg = resolve_config(compose_train("strategy=fsdp", f"paths.output_dir={tmp_path}"))
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert set(strategy.kwargs["auto_wrap_policy"]._module_classes) == {KBBlockS, KBBlockL}
    single = resolve_config(compose_train(f"paths.output_dir={tmp_path}", "trainer.accelerator=cpu"))
    assert instantiate(single.trainer, logger=False).num_devices == 1


def test_uneven_global_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        per_device_batch(64, SimpleNamespace(num_devices=3, num_nodes=1))


@pytest.mark.parametrize(("logger", "cls"), [("csv", CSVLogger), ("tensorboard", TensorBoardLogger),
                                            ("wandb", WandbLogger)])
def test_loggers_instantiate(logger: str, cls: type, tmp_path: Path) -> None:
    cfg = resolve_config(compose_train(f"logger={logger}", f"paths.output_dir={tmp_path}"))
    (built,) = training_loggers(cfg, tmp_path)
    assert isinstance(built, cls)
    if cls is WandbLogger:
        run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
        assert built._wandb_init["id"] == run_id and built._offline
        assert built._wandb_init["config"]["task"]["name"] == "gaussian_denoise"
    assert training_loggers(resolve_config(compose_train("logger=none", f"paths.output_dir={tmp_path}")),
                            tmp_path) == []


def test_build_loggers_completes_only_wandb_nodes_and_skips_null_ones(tmp_path: Path) -> None:
    """Training and evaluation build their loggers alike; only how a wandb node is completed differs."""
    cfg = OmegaConf.create({"logger": {
        "csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(tmp_path)},
        "off": None,
        "wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger", "save_dir": str(tmp_path), "offline": True,
                  "job_type": "train", "log_model": True}}})
    completed = []

    def complete(spec: dict) -> dict:
        completed.append(spec["_target_"])
        return evaluation_wandb_spec(spec)

    csv_logger, wandb_logger = build_loggers(cfg, complete)
    assert isinstance(csv_logger, CSVLogger) and isinstance(wandb_logger, WandbLogger)
    assert completed == ["lightning.pytorch.loggers.WandbLogger"]
    assert wandb_logger._wandb_init["job_type"] == "eval" and wandb_logger._log_model is False
    assert not (tmp_path / WANDB_ID_FILE).exists()  # an evaluation keeps no run id


def test_a_logger_node_that_builds_no_logger_is_refused() -> None:
    cfg = OmegaConf.create({"logger": {"bad": {"_target_": "lightning.pytorch.callbacks.Callback"}}})
    with pytest.raises(TypeError, match="logger.bad must build a Lightning Logger, got Callback"):
        build_loggers(cfg, evaluation_wandb_spec)


@pytest.mark.parametrize("debug", ["default", "fdr", "profiler"])
def test_debug_configs_compose(debug: str, tmp_path: Path) -> None:
    cfg = resolve_config(compose_train(f"debug={debug}", f"paths.output_dir={tmp_path}", "trainer.accelerator=cpu"))
    trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=False)
    assert trainer.max_steps in (1, 6, 20) and not cfg.logger


def test_unknown_keys_are_rejected_by_hydra() -> None:
    with pytest.raises(ConfigCompositionException, match="max_step"):
        compose_train("trainer.max_step=10")
    with pytest.raises(ConfigCompositionException):
        compose_train("task=no_such_task")


def test_ddp_under_multirun_is_refused(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                 f"paths.output_dir={tmp_path}"])
    cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    try:
        trainer = instantiate(cfg.trainer, logger=False)
        with pytest.raises(ValueError, match="ddp_spawn"):
            check_launch(trainer)
    finally:
        HydraConfig.instance().cfg = None
