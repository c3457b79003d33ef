"""Fine-tune one zoo model on one prepared dataset: two stages (head, then all layers),
checkpoint every epoch, resume after a crash, keep the best weights by validation metric.

This module sets a run up and owns its records (what it is, where it lives, its summary);
the loop itself is ferflow.training.loop.Trainer, reporting through callbacks
(ferflow.training.callbacks).

Run directory (`train.out_dir/<dataset>/<model>/`; the names: ferflow.layout):
    best.safetensors   weights of the best validation epoch (3-class head)
    last.pt            full training state after the last finished epoch (resume)
    history.json/.csv  one record per epoch
    train_metrics.json best validation metrics (a DVC metrics file)
    run.json           what was trained: model entry, input size, weights digest and `init`
                       (pretrained | timm-pretrained | random), params
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from torch import nn

from ferflow import __version__, fileio, layout
from ferflow.config import Params, TrainSettings, dump_params
from ferflow.data.cache import CachedSplit, split_paths
from ferflow.errors import FerflowError
from ferflow.labels import CLASSES, source_mapping
from ferflow.models.preprocess import Preprocess
from ferflow.models.weights import RANDOM_INIT
from ferflow.redact import redact_tree
from ferflow.training.callbacks import CallbackList, ConsoleCallback, TrainCallback
from ferflow.training.loop import Trainer, TrainResult
from ferflow.training.runtime import setup_runtime

if TYPE_CHECKING:
    from ferflow.models.weights import PretrainedWeights

log = logging.getLogger(__name__)

# Keys of `train` that change how fast a run goes but not what it computes: left out of the
# recipe hash (a resume continues across them) and of the train stage's `params:` in dvc.yaml
# (a test holds the two equal).
NOT_RECIPE_KEYS = ("out_dir", "workers", "threads", "datasets", "models", "cpu_keep_freed_memory")


def recipe_hash(params: Params, dataset: str, model_name: str) -> str:
    """Identifies what a run computes: a resume only continues a run with the same hash."""
    train = {k: v for k, v in params.require_train().model_dump(mode="json").items() if k not in NOT_RECIPE_KEYS}
    blob = {"seed": params.seed, "dataset": dataset, "model": model_name, "train": train,
            "weights": params.weights_for(model_name).model_dump(mode="json"),
            "archive_sha256": params.data.content_sha256(dataset)}
    if uses_timm_cache(params, model_name):
        # Weights that appear in the cache later make another run, not a resume of a random one.
        from ferflow.models import zoo
        from ferflow.models.weights import timm_cached_file

        found = timm_cached_file(zoo.resolve(model_name))
        blob["timm_weights"] = found[0] if found else "random"
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def uses_timm_cache(params: Params, model_name: str) -> bool:
    """A `timm:<arch>` model without a `models.<name>` entry: it starts from timm's weights
    in the local cache, or from random init (models.weights.timm_weights)."""
    from ferflow.models import zoo

    return zoo.resolve(model_name).head == "timm" and model_name not in params.models


def require_prepared(prepared_root: Path, dataset: str, size: int, splits: Sequence[str]) -> None:
    """FerflowError naming the command to run when `dataset` is not prepared, or lacks the
    image cache of one of `splits` at `size`."""
    data_dir = layout.prepared_dir(prepared_root, dataset)
    if not (data_dir / layout.MANIFEST).is_file():
        raise FerflowError(f"dataset {dataset} is not prepared ({data_dir / layout.MANIFEST} missing); "
                           f"run `ferflow prepare --dataset {dataset}` first")
    for split in splits:
        CachedSplit(data_dir, split, size)  # its error names the size to add to prepare.image_sizes


def preflight(params: Params, dataset: str, model_name: str) -> None:
    """What `train` needs and cannot make itself, checked before an MLflow run is opened (so a
    usage error leaves no FAILED run): the model's prepared caches (train, and the split that
    selects epochs) and its configured pretrained weights, downloaded now when remote."""
    from ferflow.models import zoo
    from ferflow.models.weights import fetch_pretrained

    cfg = params.require_train()
    size = zoo.input_size(model_name, cfg.input_size)
    data_dir = layout.prepared_dir(params.data.prepared_dir, dataset)
    require_prepared(params.data.prepared_dir, dataset, size, ["train", validation_split_name(data_dir, size)])
    if not uses_timm_cache(params, model_name):  # that one falls back to random init
        weights = params.weights_for(model_name)
        fetch_pretrained(weights.pretrained, weights.sha256, params.fetch)


def train(
    params: Params,
    dataset: str,
    model_name: str,
    run_dir: Optional[Path] = None,
    callbacks: Sequence[TrainCallback] = (),
) -> TrainResult:
    """Train (or resume) one run; the main rank also reports to the console unless `callbacks`
    already hold a ConsoleCallback."""
    from ferflow.models import zoo

    cfg = params.require_train()
    params.data.check_dataset(dataset)  # a clear error for an unknown dataset name
    entry = zoo.resolve(model_name)
    size = zoo.input_size(model_name, cfg.input_size)
    run_dir = Path(run_dir or layout.run_dir(cfg.out_dir, dataset, model_name))
    data_dir = layout.prepared_dir(params.data.prepared_dir, dataset)
    rt = setup_runtime(cfg, params.seed)
    try:
        train_split = CachedSplit(data_dir, "train", size)
        val_split = _validation_split(data_dir, size)
        model, pretrained, head_init = _build_model(params, cfg, entry, model_name)
        recipe = recipe_hash(params, dataset, model_name)
        # A mapped head already predicts: its step-0 validation is the first best checkpoint,
        # so a run never ends with weights worse on val than where it started.
        trainer = Trainer(cfg, params.seed, entry, model, train_split, val_split, rt, recipe, run_dir,
                          pretrained=pretrained is not None, validate_start=head_init == "mapped")
        info = {
            "recipe_hash": recipe,
            "dataset": dataset, "model": model_name, "arch": entry.arch, "input_size": size,
            "weights_source": pretrained.source if pretrained else "none",
            "weights_sha256": pretrained.sha256 if pretrained else None,
            "init": pretrained.init if pretrained else RANDOM_INIT,
            "head_init": head_init, "batchnorm": cfg.batchnorm,
            "device": str(rt.device), "amp": str(rt.amp_dtype), "world_size": rt.world_size,
            "n_train": len(train_split), "n_val": len(val_split), "val_split": val_split.split,
            "ferflow_version": __version__, "run_dir": str(run_dir),
            # Epochs restored from last.pt and not trained again (0: a fresh start).
            "resumed_from_epoch": trainer.resumed_from_epoch,
        }
        if rt.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            # What serving must do to an image to give it what training saw (models.inference).
            preprocess = Preprocess.for_training(entry, size, params.prepare).as_record()
            fileio.atomic_write_json(run_dir / layout.RUN_JSON, {**info, "params": redact_tree(dump_params(params)),
                                                               "classes": list(CLASSES), "preprocess": preprocess})
        console = rt.is_main and not any(isinstance(cb, ConsoleCallback) for cb in callbacks)
        reporters = CallbackList([ConsoleCallback(), *callbacks] if console else callbacks)
        reporters.on_train_start(info)
        result = trainer.run(reporters)
        if rt.is_main:
            _write_train_metrics(result)
        reporters.on_train_end(result)
        return result
    finally:
        rt.close()


def _build_model(params: Params, cfg: TrainSettings, entry,
                 model_name: str) -> tuple[nn.Module, Optional[PretrainedWeights], str]:
    """The model with its 3-class head, its pretrained weights (or None) and how the head began."""
    from ferflow.models import zoo
    from ferflow.models.weights import pretrained_for, timm_weights

    weights_cfg = params.weights_for(model_name)
    if uses_timm_cache(params, model_name):
        pretrained = timm_weights(entry)
    else:
        pretrained = pretrained_for(entry, weights_cfg.pretrained, weights_cfg.sha256, params.fetch)
    mappable = pretrained is not None and zoo.can_map_head(entry)
    head_init = "mapped" if cfg.head_init == "mapped" and mappable else "random"
    if head_init == "mapped":
        model = zoo.build_model(entry, pretrained=pretrained)
        zoo.swap_head(model, entry, len(CLASSES), source_mapping(entry.classes, params.evaluate.surprise))
    else:
        if cfg.head_init == "mapped" and entry.classes:
            log.info("%s: no pretrained weights, so the 3-class head starts random", model_name)
        model = zoo.build_model(entry, num_classes=len(CLASSES), pretrained=pretrained)
    return model, pretrained, head_init


def validation_split_name(data_dir: Path, size: int) -> str:
    """The split that selects the best epoch: val, or eval for a dataset prepared without a
    val cache at `size`. Public so that MLflow records the split training really uses."""
    return "val" if all(p.is_file() for p in split_paths(data_dir, size, "val")) else "eval"


def _validation_split(data_dir: Path, size: int) -> CachedSplit:
    split = validation_split_name(data_dir, size)
    if split != "val":
        log.warning("%s has no val split; selecting the best epoch on eval (set prepare.split.val_fraction)", data_dir)
    return CachedSplit(data_dir, split, size)


def _write_train_metrics(result: TrainResult) -> None:
    speeds = [h["images_per_s"] for h in result.history if h["images_per_s"]]  # epoch 0 trains nothing
    fileio.atomic_write_json(result.run_dir / layout.TRAIN_METRICS, {
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, **result.best_metrics,
        "train_images_per_s": float(np.mean(speeds)) if speeds else 0.0,
    })
