"""``evaluate(cfg)``: score a checkpoint on a task's test sets with the paper's protocol (``evaluate.py`` calls it).

One device, one image at a time, in a plain loop rather than ``Trainer.test``: distributed test sampling pads
shards with duplicated images (so some would be scored twice), and the protocols score numpy images with numpy
metrics anyway.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kbnet.builders import build_loggers
from kbnet.config_check import EVAL_KEYS, check_eval_config, check_known_keys
from kbnet.errors import ConfigError, DataError
from kbnet.evaluation.protocols import Protocol, get_protocol
from kbnet.evaluation.reporting import log_results, summary_markdown, summary_rows, write_summary
from kbnet.imageio import write_image
from kbnet.inference import (
    LoadedModel,
    Restorer,
    model_channels,
    model_from_checkpoint,
    model_from_official,
    resolve_device,
)
from kbnet.inference.loading import model_from_onnx, net_config_of, task_of
from kbnet.inference.onnx_model import ONNX_SUFFIX, OnnxModel
from kbnet.metrics import MetricTable
from kbnet.models import WeightLoadError, read_checkpoint
from kbnet.rundir import CONFIG_FILE, check_output_dir, write_text
from kbnet.tracking import evaluation_wandb_spec, finish_wandb

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> None:
    """Unknown keys (typos) and an ambiguous or missing weights source are refused before any work."""
    check_known_keys(cfg, EVAL_KEYS, where=" in the evaluation config")
    if (cfg.get("ckpt_path") is None) == (cfg.get("pretrained") is None):
        raise ConfigError("evaluation needs exactly one weights source: ckpt_path=<one of our checkpoints> (it "
                          "rebuilds its own model) or pretrained=<official release file> together with model=<preset>")


def load_eval_model(cfg: DictConfig) -> LoadedModel:
    """The backbone to evaluate. Our checkpoint also fills ``cfg.model`` with its saved model config, so the saved
    evaluation config (and the loggers) name the model that was actually run."""
    model_cfg = cfg.get("model")
    if cfg.get("ckpt_path") is not None:
        path = Path(cfg.ckpt_path)
        content = read_checkpoint(path)
        if net_config_of(content) is None:
            raise ConfigError(f"ckpt_path={path} is not a checkpoint of this project (no hyper_parameters.net_config); "
                              "for an official release file use pretrained=<file> model=<preset>")
        trained_for = task_of(content)
        if trained_for is not None and trained_for != cfg.task.name:
            raise ConfigError(f"ckpt_path={path} was trained for task={trained_for}, not task={cfg.task.name}: "
                              f"evaluate it with task={trained_for} (and a data= config of that task)")
        expect = None if model_cfg is None else str(model_cfg.name)
        loaded = model_from_checkpoint(path, content, weights=cfg.get("weights") or "auto", expect_name=expect)
        with open_dict(cfg):
            cfg.model = OmegaConf.create(net_config_of(content))
        return loaded
    if Path(cfg.pretrained).suffix.lower() == ONNX_SUFFIX:
        if cfg.precision != "fp32":
            raise ValueError(f"pretrained={cfg.pretrained} is an ONNX model: it runs in the precision it was exported "
                             f"in, so precision must be fp32, got {cfg.precision}")
        return model_from_onnx(cfg.pretrained, preset=None if model_cfg is None else str(model_cfg.name),
                               device=cfg.device, channels=cfg.task.channels)
    if model_cfg is None:
        raise ConfigError(f"pretrained={cfg.pretrained} holds bare weights: choose their preset with model=<name> "
                          "(kbnet_s, kbnet_s_sidd, kbnet_l, ... as in configs/model)")
    try:
        return model_from_official(cfg.pretrained, instantiate(model_cfg), str(model_cfg.name), key=cfg.get("weights"))
    except WeightLoadError as err:
        raise WeightLoadError(f"pretrained={cfg.pretrained} does not fit model={model_cfg.name} "
                              f"(task={cfg.task.name}, {cfg.task.channels} channel(s)):\n{err}") from err


def build_restorer(cfg: DictConfig, model: torch.nn.Module, protocol: Protocol) -> Restorer:
    """The protocol's forward (padding, official tiling) with the config's device, precision and overrides."""
    tile = protocol.tile if cfg.get("tile") is None else (cfg.tile or None)
    overlap = protocol.tile_overlap if cfg.get("tile_overlap") is None else cfg.tile_overlap
    device = torch.device("cpu") if isinstance(model, OnnxModel) else resolve_device(cfg.device)
    return Restorer(model, device=device, precision=cfg.precision, tile=tile,
                    tile_overlap=overlap, tile_mode="official", self_ensemble=cfg.self_ensemble,
                    pad_multiple=protocol.pad_multiple)


def select_sets(names: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    if wanted is None:
        return list(names)
    missing = [name for name in wanted if name not in names]
    if missing:
        raise ConfigError(f"sets={list(wanted)}: no test set(s) {missing} in this data config; available: "
                          f"{', '.join(names)}")
    return list(wanted)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor[0].permute(1, 2, 0).numpy()


def evaluate_set(name: str, loader: Any, restorer: Restorer, protocol: Protocol, image_dir: Path | None,
                 overwrite: bool) -> MetricTable:
    """Per-image metrics of one test set, and the restored images if ``image_dir`` is given."""
    table = MetricTable(metrics=tuple(protocol.metrics), labels=("name",), meta={"set": name, "task": protocol.name,
                                                                                   "protocol": protocol.description})
    for batch in loader:
        if batch["input"].shape[0] != 1:
            raise ValueError(f"test set {name}: the protocol scores one image at a time; the loader yields batches "
                             f"of {batch['input'].shape[0]}")
        image_name = str(batch["name"][0])
        restored = to_numpy(restorer(batch["input"]).clamp(0, 1))
        target = to_numpy(batch["target"].float())
        try:
            table.add(name=image_name, **protocol.score(restored, target))
        except ValueError as err:
            raise DataError(f"test set {name}, image {image_name}: {err}") from err
        if image_dir is not None:
            pixels = protocol.scored_pixels(restored)
            depth = 8 if pixels.dtype == np.uint8 else 16
            write_image(image_dir / f"{image_name}.png", pixels.astype(np.float32) / (255.0 if depth == 8 else 1.0),
                        bit_depth=depth, overwrite=overwrite)
    if not len(table):
        raise DataError(f"test set {name} is empty")
    return table


def combined_table(name: str, members: Sequence[str], tables: Mapping[str, MetricTable],
                   protocol: Protocol) -> MetricTable:
    """All images of ``members`` in one table: its means are per-image means over the union (DPDD combined)."""
    table = MetricTable(metrics=tuple(protocol.metrics), labels=("set", "name"),
                        meta={"set": name, "members": list(members), "task": protocol.name})
    for member in members:
        for row in tables[member].rows:
            table.add(set=member, **row)
    return table


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate one checkpoint on every test set of ``cfg.data``; returns the run directory and the per-set means."""
    check_config(cfg)
    check_eval_config(cfg)
    cfg = copy.deepcopy(cfg)
    if cfg.get("torch_threads") is not None:
        torch.set_num_threads(cfg.torch_threads)
    loaded = load_eval_model(cfg)
    OmegaConf.resolve(cfg)
    protocol = get_protocol(cfg.task.name)
    channels = model_channels(loaded.model)
    if channels != cfg.task.channels:
        raise ConfigError(f"the model ({loaded.source}) takes {channels}-channel images but task {cfg.task.name} is "
                          f"set up for task.channels={cfg.task.channels}")
    out_dir = Path(cfg.paths.output_dir)
    check_output_dir(out_dir, cfg.overwrite)
    restorer = build_restorer(cfg, loaded.model, protocol)
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    loaders = dict(zip(datamodule.test_set_names, datamodule.test_dataloader(), strict=True))
    names = select_sets(list(loaders), cfg.get("sets"))

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg))
    log.info("evaluating %s on %s with the %s protocol; results in %s", loaded.source, ", ".join(names),
             protocol.name, out_dir)
    tables: dict[str, MetricTable] = {}
    for name in names:
        image_dir = out_dir / "images" / name if cfg.save_images else None
        tables[name] = evaluate_set(name, loaders[name], restorer, protocol, image_dir, cfg.overwrite)
        tables[name].write_reports(out_dir / name, overwrite=cfg.overwrite)
        log.info("%s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in tables[name].means().items()))
    for name, members in protocol.combine(names).items():
        tables[name] = combined_table(name, members, tables, protocol)
        tables[name].write_reports(out_dir / name, overwrite=cfg.overwrite)

    rows = summary_rows(tables)
    meta = {"task": cfg.task.name, "model": loaded.source, "protocol": protocol.description,
            "self_ensemble": bool(cfg.self_ensemble), "tile": restorer.tile}
    write_summary(out_dir / "summary", rows, meta, overwrite=cfg.overwrite)
    log.info("\n%s", summary_markdown(rows, ["set", "images", *protocol.metrics], f"{cfg.task.name}: {loaded.source}"))

    loggers = build_loggers(cfg, evaluation_wandb_spec)
    succeeded = False
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg))
        log_results(loggers, rows, tables)
        succeeded = True
    finally:
        finish_wandb(loggers, succeeded)
    return {"output_dir": str(out_dir), "results": {row["set"]: dict(row) for row in rows}}
