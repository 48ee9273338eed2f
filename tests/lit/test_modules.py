"""The task LightningModules: noise synthesis, metrics, the recipe inside a real Trainer, NaN stop, EMA."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from kbnet.lit import (
    DeblurModule,
    DenoiseModule,
    DerainModule,
    GaussianDenoiseModule,
    NonFiniteGradientError,
)
from kbnet.lit.augment import step_rng
from kbnet.lit.ema import EMA
from kbnet.lit.losses import build_loss
from kbnet.lit.schedule import ProgressiveSchedule, cosine_restart_lr, scaled_boundaries
from kbnet.metrics import psnr as exact_psnr
from kbnet.metrics import to_y_uint8_levels
from kbnet.models import create_model, load_weights
from kbnet.models.padding import reflect_pad
from tests.helpers.lit import NET_CONFIG, RECIPE, PairsData, fit, tiny_net

pytestmark = pytest.mark.usefixtures("single_thread")

PROGRESSIVE = {"iters": [92000, 64000, 48000, 36000, 36000, 24000], "patch_sizes": [16, 16, 24, 24, 32, 32],
               "batch_sizes": [8, 5, 3, 2, 1, 1]}


# ------------------------------------------------------------------------------------- Gaussian noise
def test_fixed_sigma_noise_has_the_right_level_and_is_reproducible() -> None:
    module = GaussianDenoiseModule(tiny_net(), NET_CONFIG, sigma=25, mixup_prob=0.0, **RECIPE)
    clean = torch.rand(4, 3, 64, 64)
    noisy, target = module.transform_train_pair(clean, clean, step_rng(1, 0, 0))
    assert target is clean
    assert (noisy - clean).std().item() == pytest.approx(25 / 255, rel=0.02)
    again, _ = module.transform_train_pair(clean, clean, step_rng(1, 0, 0))
    assert torch.equal(noisy, again)
    other, _ = module.transform_train_pair(clean, clean, step_rng(1, 1, 0))
    assert not torch.equal(noisy, other)


def test_blind_sigma_is_drawn_per_sample_within_the_range() -> None:
    module = GaussianDenoiseModule(tiny_net(), NET_CONFIG, sigma_range=[0, 50], mixup_prob=0.0, **RECIPE)
    clean = torch.rand(16, 1, 64, 64)
    noisy, _ = module.transform_train_pair(clean, clean, step_rng(2, 0, 0))
    stds = (noisy - clean).flatten(1).std(dim=1) * 255
    assert stds.min() >= 0 and stds.max() <= 50 * 1.05
    assert stds.max() - stds.min() > 10


def test_gaussian_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        GaussianDenoiseModule(tiny_net(), NET_CONFIG, **RECIPE)
    with pytest.raises(ValueError, match="exactly one"):
        GaussianDenoiseModule(tiny_net(), NET_CONFIG, sigma=15, sigma_range=[0, 50], **RECIPE)
    with pytest.raises(ValueError, match="sigma_range"):
        GaussianDenoiseModule(tiny_net(), NET_CONFIG, sigma_range=[50, 10], **RECIPE)


def test_gaussian_module_refuses_degraded_training_inputs(tmp_path: Path) -> None:
    module = GaussianDenoiseModule(tiny_net(), NET_CONFIG, sigma=25, **RECIPE)
    with pytest.raises(ValueError, match="input == target"):
        fit(module, PairsData(clean_train=False), tmp_path, max_steps=1)


def test_validation_pads_images_smaller_than_the_pad_as_evaluation_does(tmp_path: Path) -> None:
    """A 12×13 image padded to 32 needs 20 more rows and 19 more columns, more than ``F.pad(mode="reflect")``
    allows (the pad must be smaller than the side); SSIM's 11×11 window sets the smallest validation image."""
    module = DenoiseModule(tiny_net(), NET_CONFIG, val_pad_multiple=32, **RECIPE).eval()
    inp = torch.rand(1, 3, 12, 13, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        restored = module.restore(inp)
        expected = module.net(reflect_pad(inp, 0, 20, 0, 19))[..., :12, :13].clamp(0, 1)
    assert torch.equal(restored, expected)
    val = [{"input": inp[0], "target": inp[0].clone(), "name": "small"}]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.validate(module, dataloaders=DataLoader(val, batch_size=1))
    assert torch.isfinite(trainer.callback_metrics["val/psnr"])


# ------------------------------------------------------------------------------- losses, EMA, metrics
def test_losses_by_name() -> None:
    pred, target = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert build_loss("l1")(pred, target).item() == pytest.approx(0.5)
    assert build_loss("mse")(pred, target).item() == pytest.approx(0.25)
    assert build_loss("charbonnier")(pred, target).item() == pytest.approx((0.25 + 1e-6) ** 0.5)
    assert build_loss("psnr")(pred, target).item() == pytest.approx(10 * np.log10(0.25), abs=1e-5)
    with pytest.raises(ValueError, match="available: charbonnier, l1, mse, psnr"):
        build_loss("ssim")


def test_ema_trails_the_weights() -> None:
    net = nn.Linear(2, 2)
    ema = EMA(net, decay=0.9)
    before = ema.module.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.module.weight, 0.9 * before + 0.1 * net.weight)
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(net, decay=1.0)


def test_derain_y_metric_matches_the_exact_uint8_protocol() -> None:
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    restored = np.clip(clean.astype(np.int16) + rng.integers(-20, 21, size=clean.shape), 0, 255).astype(np.uint8)
    expected = exact_psnr(restored, clean, y_channel=True)
    as_tensor = [torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255 for a in (restored, clean)]
    module = DerainModule(tiny_net(), NET_CONFIG, **RECIPE)
    assert module.image_metrics(*as_tensor)["psnr"].item() == pytest.approx(expected, abs=1e-3)
    rgb = DeblurModule(tiny_net(), NET_CONFIG, **RECIPE).image_metrics(*as_tensor)["psnr"].item()
    assert abs(rgb - expected) > 0.1
    assert to_y_uint8_levels(as_tensor[1]).shape == (1, 1, 40, 48)


# ----------------------------------------------------------------------------------- inside a Trainer
class Recorder(L.Callback):
    """Learning rate and the shape of the batch the backbone trains on, per optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.shapes: list[tuple[int, ...]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self._handle = pl_module.net.register_forward_pre_hook(
            lambda _m, args: self.shapes.append(tuple(args[0].shape)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._handle.remove()


@pytest.mark.parametrize(("cls", "clean", "extra"), [
    (GaussianDenoiseModule, True, {"sigma": 25}),
    (DenoiseModule, False, {}),
    (DerainModule, False, {}),
    (DeblurModule, False, {}),
])
def test_every_task_module_trains_and_validates(cls, clean: bool, extra: dict, tmp_path: Path) -> None:
    max_steps = 6
    recorder = Recorder()
    module = cls(tiny_net(), NET_CONFIG, progressive=PROGRESSIVE, **extra, **RECIPE)
    trainer = fit(module, PairsData(clean_train=clean), tmp_path, max_steps=max_steps, callbacks=[recorder])
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/lr", "train/grad_norm", "val/psnr", "val/ssim", "val/psnr_input"):
        assert torch.isfinite(metrics[key]), key
    boundaries = scaled_boundaries(RECIPE["lr_schedule"]["periods"], max_steps)
    assert recorder.lrs == pytest.approx([cosine_restart_lr(s, boundaries, 3e-4, [3e-4, 1e-6])
                                          for s in range(max_steps)])
    schedule = ProgressiveSchedule(**PROGRESSIVE, max_steps=max_steps)
    expected = [(schedule.stage(s, 8).batch_size, 3, schedule.stage(s, 8).patch_size) for s in range(max_steps)]
    assert [(b, c, h) for b, c, h, _w in recorder.shapes] == expected


def test_checkpoint_rebuilds_the_backbone(tmp_path: Path) -> None:
    module = DeblurModule(tiny_net(), NET_CONFIG, ema_decay=0.9, **RECIPE)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(module, PairsData(clean_train=False), tmp_path, max_steps=2, enable_checkpointing=True,
        callbacks=[checkpoint])
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["net_config"] == NET_CONFIG
    assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])
    rebuilt = instantiate(ckpt["hyper_parameters"]["net_config"])
    load_weights(rebuilt, tmp_path / "ckpt" / "last.ckpt")
    x = torch.rand(1, 3, 24, 24)
    torch.testing.assert_close(rebuilt(x), module.net(x))


class NaNAfter(nn.Module):
    """Wraps a backbone; from the given training forward on, its output is NaN."""

    def __init__(self, net: nn.Module, after: int) -> None:
        super().__init__()
        self.net, self.after, self.calls = net, after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                return out * float("nan")
        return out


def test_nan_loss_stops_before_the_update_and_keeps_good_checkpoints(tmp_path: Path) -> None:
    module = DeblurModule(NaNAfter(tiny_net(), after=3), NET_CONFIG, **RECIPE)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    with pytest.raises(NonFiniteGradientError, match="step 3"):
        fit(module, PairsData(clean_train=False), tmp_path, max_steps=10, enable_checkpointing=True,
            callbacks=[checkpoint], val_check_interval=50)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_float16_is_refused_and_bf16_trains(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bf16-mixed"):
        fit(DeblurModule(tiny_net(), NET_CONFIG, **RECIPE), PairsData(clean_train=False), tmp_path,
            max_steps=1, precision="16-true")
    data = PairsData(clean_train=False, size=16, val_size=24)
    trainer = fit(DeblurModule(tiny_net(), NET_CONFIG, **RECIPE), data, tmp_path, max_steps=1,
                  val_check_interval=1, precision="bf16-mixed")
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.isfinite(trainer.callback_metrics["val/psnr"])


def test_step_based_schedules_need_max_steps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_steps"):
        fit(DeblurModule(tiny_net(), NET_CONFIG, **RECIPE), PairsData(clean_train=False), tmp_path,
            max_steps=-1, max_epochs=1)


def test_model_and_recipe_hyperparameters_are_plain(tmp_path: Path) -> None:
    module = GaussianDenoiseModule(create_model("kbnet_s_tiny", width=8), NET_CONFIG, sigma=15, **RECIPE)
    assert module.hparams["sigma"] == 15 and module.hparams["mixup_prob"] == 0.5
    assert module.hparams["optimizer"]["lr"] == 3e-4 and "net" not in module.hparams
