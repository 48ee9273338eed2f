"""evaluate(cfg): the paper's per-task protocols on demo data, generated SIDD blocks, DPDD splits and Gaussian sets."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import skimage.data
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

import kbnet.evaluation.runner
from kbnet.evaluation import PROTOCOLS, evaluate
from kbnet.evaluation.protocols import indoor_outdoor_pairs
from kbnet.imageio import read_image
from kbnet.models import WeightLoadError
from kbnet.training import train
from tests.helpers.checkpoints import save_official_checkpoint, save_project_checkpoint
from tests.helpers.configs import SMALL_DEMO, compose_eval, compose_train, tiny_run_overrides
from tests.helpers.wandb_records import offline_runs

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread avoids OpenMP spin-waits


def report(out_dir: Path, name: str) -> dict:
    return json.loads((out_dir / f"{name}.json").read_text())


def rgb_photo(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 crop of scikit-image's astronaut, offset by ``seed``."""
    return np.ascontiguousarray(skimage.data.astronaut()[40 * seed:40 * seed + height, 60 * seed:60 * seed + width])


# --------------------------------------------------------------------------------------- every task on demo
@pytest.mark.parametrize(("task", "model", "channels"), [
    ("gaussian_denoise", "kbnet_s_tiny", 3),
    ("gaussian_denoise_gray", "kbnet_s_tiny", 1),
    ("real_denoise", "kbnet_s_tiny", 3),
    ("derain", "kbnet_l_tiny", 3),
    ("defocus_deblur", "kbnet_l_tiny", 3),
    ("motion_deblur", "kbnet_l_tiny", 3),
])
def test_every_task_evaluates_a_checkpoint_on_the_demo_data(tmp_path, task, model, channels):
    ckpt = tmp_path / "last.ckpt"
    sizes = {"kbnet_s_tiny": {"width": 8, "img_channel": channels}, "kbnet_l_tiny": {"dim": 12}}
    save_project_checkpoint(ckpt, model, **sizes[model])
    out = tmp_path / "eval"
    result = evaluate(compose_eval(out, f"task={task}", f"ckpt_path={ckpt}", *SMALL_DEMO))
    protocol = PROTOCOLS[task.removesuffix("_gray")]
    demo = report(out, "demo")
    assert demo["count"] == 3 and [r["name"] for r in demo["images"]] == ["chelsea", "motorcycle", "coins"]
    assert set(demo["mean"]) == set(protocol.metrics)
    assert all(np.isfinite(v) for v in demo["mean"].values())
    assert result["results"]["demo"]["psnr" if "psnr" in protocol.metrics else "psnr_y"] == pytest.approx(
        demo["mean"]["psnr" if "psnr" in protocol.metrics else "psnr_y"])
    summary = report(out, "summary")
    assert summary["sets"][0]["set"] == "demo" and summary["task"] == task.removesuffix("_gray")
    assert (out / "demo.md").read_text().count("|") > 10 and (out / "demo.csv").is_file()
    saved = (out / "config.yaml").read_text()
    assert f"name: {model}" in saved  # the model the checkpoint rebuilt, not a config default


def test_official_weights_with_model_preset_and_csv_logger(tmp_path):
    weights = tmp_path / "official.pth"
    save_official_checkpoint(weights, "kbnet_l_tiny", wrapper="params")
    out = tmp_path / "eval"
    evaluate(compose_eval(out, "task=derain", "model=kbnet_l_tiny", f"pretrained={weights}", "logger=csv",
                          *SMALL_DEMO))
    assert set(report(out, "demo")["mean"]) == {"psnr_y", "ssim_y"}
    metrics_csv = next((out / "csv").rglob("metrics.csv")).read_text()
    assert "test/demo/psnr_y" in metrics_csv


def test_wandb_offline_gets_the_results_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    ckpt = tmp_path / "last.ckpt"
    save_project_checkpoint(ckpt, "kbnet_s_tiny", width=8)
    out = tmp_path / "eval"
    evaluate(compose_eval(out, f"ckpt_path={ckpt}", "logger=wandb", *SMALL_DEMO))
    tables = list((out / "wandb").rglob("results_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["set", "images", "psnr", "ssim"] and table["data"][0][:2] == ["demo", 3]
    assert list((out / "wandb").rglob("images_*.table.json"))
    (run,) = offline_runs(out / "wandb")
    assert run.exit_code == 0


def test_an_evaluation_failing_to_log_finishes_its_wandb_run_with_a_failure_exit_code(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))

    def lost_connection(*args):
        raise ConnectionError("simulated logging failure")

    monkeypatch.setattr(kbnet.evaluation.runner, "log_results", lost_connection)
    ckpt = tmp_path / "last.ckpt"
    save_project_checkpoint(ckpt, "kbnet_s_tiny", width=8)
    out = tmp_path / "eval"
    with pytest.raises(ConnectionError, match="simulated logging failure"):
        evaluate(compose_eval(out, f"ckpt_path={ckpt}", "logger=wandb", *SMALL_DEMO))
    (run,) = offline_runs(out / "wandb")
    assert run.exit_code == 1
    import wandb

    assert wandb.run is None


def test_a_trained_checkpoint_scores_as_its_validation(tmp_path):
    """End to end with the real training code: its Lightning checkpoint rebuilds the model, and the SIDD-style
    float protocol on the demo photos (sizes are multiples of 16, so no padding differs) reproduces val/psnr.
    The checkpoint names its task, so another task's protocol is refused before anything is written."""
    run = tmp_path / "run"
    metrics = train(compose_train(*tiny_run_overrides(run), "task=real_denoise", "trainer.max_steps=2",
                                  "trainer.val_check_interval=2", "trainer.limit_val_batches=3"))
    out = tmp_path / "eval"
    result = evaluate(compose_eval(out, "task=real_denoise", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                                   "data.val_size=48", "data.train_size=64"))
    assert result["results"]["demo"]["psnr"] == pytest.approx(metrics["val/psnr"], abs=1e-3)
    with pytest.raises(ValueError, match="trained for task=real_denoise, not task=gaussian_denoise: evaluate it with"):
        evaluate(compose_eval(tmp_path / "wrong", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", *SMALL_DEMO))
    assert not (tmp_path / "wrong").exists()


# ------------------------------------------------------------------------------------------------ bad input
def test_weights_source_errors(tmp_path):
    official = tmp_path / "official.pth"
    save_official_checkpoint(official, "kbnet_s_tiny")
    with pytest.raises(ValueError, match="exactly one weights source"):
        evaluate(compose_eval(tmp_path / "a", *SMALL_DEMO))
    with pytest.raises(ValueError, match="model=<name>"):
        evaluate(compose_eval(tmp_path / "b", f"pretrained={official}", *SMALL_DEMO))
    with pytest.raises(WeightLoadError, match="does not fit model=kbnet_l_tiny"):
        evaluate(compose_eval(tmp_path / "c", f"pretrained={official}", "model=kbnet_l_tiny", *SMALL_DEMO))
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        evaluate(compose_eval(tmp_path / "d", f"ckpt_path={official}", *SMALL_DEMO))
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_checkpoint_for_another_preset_or_channel_count(tmp_path):
    ckpt = tmp_path / "gray.ckpt"
    save_project_checkpoint(ckpt, "kbnet_s_tiny", width=8, img_channel=1)
    with pytest.raises(ValueError, match="holds a 'kbnet_s_tiny' model, not 'kbnet_l_tiny'"):
        evaluate(compose_eval(tmp_path / "a", f"ckpt_path={ckpt}", "model=kbnet_l_tiny", *SMALL_DEMO))
    with pytest.raises(ValueError, match=r"1-channel images but task gaussian_denoise .* task.channels=3"):
        evaluate(compose_eval(tmp_path / "b", f"ckpt_path={ckpt}", *SMALL_DEMO))


def test_existing_results_are_kept_unless_overwrite(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    save_project_checkpoint(ckpt, "kbnet_s_tiny", width=8)
    out = tmp_path / "eval"
    evaluate(compose_eval(out, f"ckpt_path={ckpt}", *SMALL_DEMO))
    before = (out / "demo.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite=true"):
        evaluate(compose_eval(out, f"ckpt_path={ckpt}", *SMALL_DEMO))
    assert (out / "demo.json").read_text() == before
    evaluate(compose_eval(out, f"ckpt_path={ckpt}", "overwrite=true", *SMALL_DEMO))
    assert (out / "demo.json").read_text() == before  # same checkpoint, same protocol: same numbers


def test_unknown_keys_and_sets_are_refused(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    save_project_checkpoint(ckpt, "kbnet_s_tiny", width=8)
    with pytest.raises(ValueError, match="unknown top-level config key"):
        evaluate(compose_eval(tmp_path / "a", f"ckpt_path={ckpt}", "+tiles=3", *SMALL_DEMO))
    with pytest.raises(ValueError, match=r"no test set\(s\) \['Kodak'\].*available: demo"):
        evaluate(compose_eval(tmp_path / "b", f"ckpt_path={ckpt}", "sets=[Kodak]", *SMALL_DEMO))


# -------------------------------------------------------------------------------------- Gaussian protocol
def official_gaussian_psnr(net: torch.nn.Module, clean: np.ndarray, sigma: float) -> tuple[float, np.ndarray]:
    """The official test, restated: seed 0, float64 noise into float32, reflect-pad to 8, crop, clamp, rint."""
    img = np.float32(clean) / 255.0
    np.random.seed(seed=0)
    img += np.random.normal(0, sigma / 255.0, img.shape)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    h, w = x.shape[-2:]
    padded = F.pad(x, (0, (8 - w % 8) % 8, 0, (8 - h % 8) % 8), mode="reflect")
    with torch.no_grad():
        restored = torch.clamp(net(padded)[..., :h, :w], 0, 1)[0].permute(1, 2, 0).numpy()
    out8 = np.rint(restored * 255).astype(np.uint8)
    mse = np.mean((out8.astype(np.float64) - clean.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse), out8


def test_gaussian_gray_protocol_matches_the_official_steps(tmp_path):
    data = tmp_path / "data" / "test"
    sizes = {"a": (37, 45), "b": (40, 29)}
    for folder in ("Set12", "BSD68", "Urban100"):
        (data / folder).mkdir(parents=True)
        for i, (name, size) in enumerate(sizes.items()):
            cv2.imwrite(str(data / folder / f"{name}.png"), cv2.cvtColor(rgb_photo(*size, i + 1), cv2.COLOR_RGB2GRAY))
    ckpt = tmp_path / "gray.ckpt"
    net = save_project_checkpoint(ckpt, "kbnet_s_tiny", width=8, img_channel=1)
    args = ("task=gaussian_denoise_gray", "task.sigma=50", "data=dfwb", f"paths.data_dir={tmp_path / 'data'}",
            "data.num_workers=0", "data.pin_memory=false", "sets=[Set12]", f"ckpt_path={ckpt}")
    first = tmp_path / "first"
    evaluate(compose_eval(first, *args, "save_images=true"))
    rows = {r["name"]: r for r in report(first, "Set12")["images"]}
    for name in sizes:
        clean = cv2.imread(str(data / "Set12" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)[:, :, None]
        expected_psnr, expected_out = official_gaussian_psnr(net, clean, 50)
        assert rows[name]["psnr"] == pytest.approx(expected_psnr, abs=1e-9)
        saved = cv2.imread(str(first / "images" / "Set12" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(saved, expected_out[:, :, 0])
    second = tmp_path / "second"
    evaluate(compose_eval(second, *args))
    assert report(second, "Set12")["images"] == report(first, "Set12")["images"]  # the noise is seeded


# ------------------------------------------------------------------------------------------------- SIDD
def test_sidd_protocol_on_generated_mat_blocks(tmp_path):
    rng = np.random.default_rng(0)
    gt = np.stack([np.stack([rgb_photo(24, 24, i + j) for j in range(3)]) for i in range(2)])
    noisy = np.clip(gt.astype(int) + rng.integers(-25, 26, gt.shape), 0, 255).astype(np.uint8)
    folder = tmp_path / "data" / "test" / "SIDD"
    folder.mkdir(parents=True)
    scipy.io.savemat(folder / "ValidationNoisyBlocksSrgb.mat", {"ValidationNoisyBlocksSrgb": noisy})
    scipy.io.savemat(folder / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": gt})
    ckpt = tmp_path / "sidd.ckpt"
    net = save_project_checkpoint(ckpt, "kbnet_s_tiny", width=8)
    out = tmp_path / "eval"
    evaluate(compose_eval(out, "task=real_denoise", "data=sidd", f"paths.data_dir={tmp_path / 'data'}",
                          "data.num_workers=0", "data.pin_memory=false", f"ckpt_path={ckpt}"))
    sidd = report(out, "SIDD")
    assert sidd["count"] == 6 and [r["name"] for r in sidd["images"]][:4] == ["00_00", "00_01", "00_02", "01_00"]
    row = sidd["images"][4]  # image 1, block 1
    x = torch.from_numpy(noisy[1, 1].astype(np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        out_f32 = net(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    gt_f32 = gt[1, 1].astype(np.float32) / 255
    assert row["psnr"] == pytest.approx(10 * np.log10(1 / np.mean((out_f32.astype(np.float64) - gt_f32) ** 2)))
    # the official script's SSIM: old scikit-image defaults on float32, i.e. data range 2, 7x7 box window
    legacy = structural_similarity(gt_f32, out_f32, channel_axis=2, data_range=2.0)
    assert row["ssim_legacy"] == pytest.approx(legacy, abs=1e-6)
    assert row["ssim"] < row["ssim_legacy"]


# ------------------------------------------------------------------------------------------------- DPDD
def test_dpdd_indoor_outdoor_and_combined(tmp_path):
    root = tmp_path / "data" / "test" / "DPDD"
    for sub in ("inputC", "target"):
        (root / sub).mkdir(parents=True)
    for i in range(5):
        clean = rgb_photo(32, 40, i)
        blurred = cv2.GaussianBlur(clean, (0, 0), 1.0 + 0.3 * i)
        cv2.imwrite(str(root / "target" / f"{i}.png"), clean[:, :, ::-1])
        cv2.imwrite(str(root / "inputC" / f"{i}.png"), blurred[:, :, ::-1])
    np.save(root / "indoor_labels.npy", np.array([1, 3, 4]))
    np.save(root / "outdoor_labels.npy", np.array([2, 5]))
    ckpt = tmp_path / "dpdd.ckpt"
    net = save_project_checkpoint(ckpt, "kbnet_l_tiny", dim=12)
    out = tmp_path / "eval"
    result = evaluate(compose_eval(out, "task=defocus_deblur", "data=dpdd", f"paths.data_dir={tmp_path / 'data'}",
                                   "data.num_workers=0", "data.pin_memory=false", f"ckpt_path={ckpt}"))
    indoor, outdoor, combined = (report(out, f"DPDD_{s}") for s in ("indoor", "outdoor", "combined"))
    assert [r["name"] for r in indoor["images"]] == ["0", "2", "3"] and [r["name"] for r in outdoor["images"]] == \
        ["1", "4"]
    for metric in ("psnr", "ssim", "mae"):
        values = [r[metric] for r in indoor["images"] + outdoor["images"]]
        assert combined["mean"][metric] == pytest.approx(np.mean(values))
    assert combined["count"] == 5 and set(result["results"]) == {"DPDD_indoor", "DPDD_outdoor", "DPDD_combined"}
    # one image by hand: float PSNR, skimage SSIM (data range 1, 7x7 box), MAE
    inp = read_image(root / "inputC" / "3.png").pixels
    target = read_image(root / "target" / "3.png").pixels
    with torch.no_grad():
        restored = net(torch.from_numpy(inp).permute(2, 0, 1)[None]).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    row = indoor["images"][2]
    assert row["psnr"] == pytest.approx(10 * np.log10(1 / np.mean((restored.astype(np.float64) - target) ** 2)))
    assert row["ssim"] == pytest.approx(structural_similarity(target, restored, channel_axis=2, data_range=1.0),
                                        abs=1e-6)
    assert row["mae"] == pytest.approx(np.mean(np.abs(restored.astype(np.float64) - target)), abs=1e-7)


def test_indoor_outdoor_pairing_names():
    assert indoor_outdoor_pairs(["DPDD_indoor", "DPDD_outdoor", "other"]) == {
        "DPDD_combined": ["DPDD_indoor", "DPDD_outdoor"]}
    assert indoor_outdoor_pairs(["DPDD_indoor"]) == {}
