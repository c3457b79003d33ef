"""Evaluate fine-tuned runs (and pretrained heads zero-shot) on the eval split of every
dataset: the cross-dataset matrix, written as files per (model, train set, eval set)
(paths: ferflow.layout).

    <evaluate.out_dir>/fine-tuned/<train dataset>/<model>/<eval dataset>/metrics.json ...
    <evaluate.out_dir>/fine-tuned/<train dataset>/<model>.json   (summary; DVC metrics)
    <evaluate.out_dir>/zero-shot/none/<model>/<eval dataset>/metrics.json ...
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pandas as pd
import torch

from ferflow import fileio, layout
from ferflow.config import Params
from ferflow.data.cache import CachedSplit
from ferflow.errors import FerflowError
from ferflow.evaluation.gallery import write_error_gallery
from ferflow.evaluation.metrics import compute_metrics, write_evaluation
from ferflow.labels import CLASSES
from ferflow.models import inference
from ferflow.training.runtime import select_device

log = logging.getLogger(__name__)


def _manifest_paths(data_dir: Path, split: str) -> list[str]:
    manifest = pd.read_parquet(data_dir / layout.MANIFEST, columns=["path", "split", "cache_index"])
    return manifest[manifest["split"] == split].sort_values("cache_index")["path"].tolist()


def evaluate_run(params: Params, dataset: str, model_name: str, eval_datasets: Optional[Iterable[str]] = None) -> dict:
    """Evaluate the run trained on `dataset` on the eval split of each eval dataset, beside
    the zero-shot result of the checkpoint it started from on the same images
    (`baseline_accuracy`, `baseline_macro_f1`): promotion refuses a model below it."""
    device = select_device(params.require_train().device)
    predictor = inference.load_run(layout.run_dir(params.require_train().out_dir, dataset, model_name), device)
    info, size = predictor.info, predictor.preprocess.size
    out_root = layout.eval_dir(params.evaluate.out_dir, dataset, model_name)
    meta = {"model": model_name, "train_dataset": dataset, "stage": layout.FINE_TUNED, "input_size": size}
    eval_datasets = list(eval_datasets or []) or prepared_eval_datasets(params, dataset, size)
    baseline = _zero_shot_probs(params, model_name, device, expected_sha256=info.get("weights_sha256"), size=size)
    batch = params.evaluate.batch_size
    summary = _evaluate_each(params, out_root, eval_datasets, size, meta,
                             lambda split: predictor.probabilities_of_split(split, batch), baseline)
    if dataset in summary:  # in-domain predictions, for DVC's confusion-matrix plot
        in_domain = layout.eval_cell(out_root, dataset) / layout.PREDICTIONS
        fileio.atomic_write_bytes(layout.predictions_plot_path(out_root), in_domain.read_bytes())
    return summary


def preflight_run(params: Params, dataset: str, model_name: str,
                  eval_datasets: Optional[Iterable[str]] = None) -> list[str]:
    """What `evaluate_run` needs, checked before MLflow is contacted or anything computed: the
    trained run, and each eval dataset's cache of the eval split at the run's input size.
    Returns the eval datasets: those given, else the default ones that are prepared."""
    from ferflow.training.trainer import require_prepared

    run_dir = layout.run_dir(params.require_train().out_dir, dataset, model_name)
    layout.trained_files(run_dir)
    size = int(layout.read_run_info(run_dir)["input_size"])
    names = list(eval_datasets or [])
    for eval_ds in names:
        require_prepared(params.data.prepared_dir, eval_ds, size, [params.evaluate.split])
    return names or prepared_eval_datasets(params, dataset, size)


def prepared_eval_datasets(params: Params, dataset: Optional[str], size: int) -> list[str]:
    """The default eval datasets (`eval_datasets_for`) whose eval split is prepared at `size`:
    a user who prepared only their own archive evaluates on it. Each one left out is logged
    with the reason, one line; FerflowError when none is left."""
    from ferflow.training.trainer import require_prepared

    kept = []
    for name in eval_datasets_for(params, dataset):
        try:
            require_prepared(params.data.prepared_dir, name, size, [params.evaluate.split])
        except FerflowError as exc:
            log.warning("evaluate: skipping %s: %s", name, exc)
            continue
        kept.append(name)
    if not kept:
        raise FerflowError(f"no dataset is prepared at size {size} to evaluate on; run `ferflow prepare` "
                           f"with {size} in prepare.image_sizes")
    return kept


def eval_datasets_for(params: Params, dataset: Optional[str] = None) -> list[str]:
    """Every archive's eval split; a union's own (all members' eval images) is added for a
    model trained on that union: its in-domain result."""
    names = list(params.data.archives)
    return [*names, dataset] if dataset in params.data.unions else names


def _evaluate_each(params: Params, out_root: Path, eval_datasets: Iterable[str], size: int,
                   meta: dict, probs_for, baseline=None) -> dict:
    """Probabilities from `probs_for(split)` on each dataset's eval split, written as
    evaluation files under `out_root/<dataset>/`, plus the summary beside `out_root`;
    with `baseline` (a zero-shot `probs_for`), its accuracy and macro-F1 on the same split."""
    summary = {}
    for eval_ds in eval_datasets:
        data_dir = layout.prepared_dir(params.data.prepared_dir, eval_ds)
        split = CachedSplit(data_dir, params.evaluate.split, size)
        probs = probs_for(split)
        paths = _manifest_paths(data_dir, params.evaluate.split)
        cell = layout.eval_cell(out_root, eval_ds)
        metrics = write_evaluation(
            cell, split.labels, probs.argmax(1), probs, CLASSES,
            {**meta, "eval_dataset": eval_ds, "split": params.evaluate.split},
            paths=paths,
        )
        # After write_evaluation, whose checks explain bad input best; the tiles are read
        # from the memmap, only the chosen rows.
        title = " · ".join(str(v) for v in (meta.get("model"), meta.get("train_dataset"), eval_ds, meta.get("stage")))
        write_error_gallery(cell / layout.ERRORS_PNG, split.images, split.labels, probs, CLASSES, paths, title=title)
        summary[eval_ds] = {k: metrics[k] for k in ("accuracy", "macro_f1", "n")}
        if baseline is not None:
            before = compute_metrics(split.labels, baseline(split).argmax(1), CLASSES)
            summary[eval_ds].update({f"baseline_{k}": before[k] for k in ("accuracy", "macro_f1")})
    fileio.atomic_write_json(layout.summary_path(out_root), summary)
    return summary


def _zero_shot_probs(params: Params, model_name: str, device: torch.device,
                     expected_sha256: Optional[str] = None, size: Optional[int] = None):
    """`probs_for(split)` of the pretrained head mapped to 3 classes, or None when the model
    has no expression head or no weights (nothing to compare against)."""
    predictor = inference.load_zero_shot(params, model_name, device, expected_sha256, size)
    if predictor is None:
        log.info("%s: no zero-shot evaluation: %s", model_name, _skip_reason(params, model_name))
        return None
    return lambda split: predictor.probabilities_of_split(split, params.evaluate.batch_size)


def _skip_reason(params: Params, model_name: str) -> Optional[str]:
    from ferflow.models import zoo

    return inference.zero_shot_skip_reason(zoo.resolve(model_name), params.weights_for(model_name).pretrained)


def evaluate_zero_shot(params: Params, model_name: str, eval_datasets: Optional[Iterable[str]] = None) -> dict:
    """The pretrained 7/8-class head mapped to 3 classes, before any fine-tuning."""
    from ferflow.models import zoo

    out_root = layout.zero_shot_dir(params.evaluate.out_dir, model_name)
    device = select_device(params.require_train().device)
    size = zoo.input_size(model_name, params.require_train().input_size)
    probs_for = _zero_shot_probs(params, model_name, device, size=size) if params.evaluate.zero_shot else None
    if probs_for is None:
        # A DAG runs this stage for every model; one without an expression head has no
        # "before fine-tuning" row, which is recorded rather than failed.
        why_not = ("evaluate.zero_shot is false" if not params.evaluate.zero_shot
                   else _skip_reason(params, model_name))
        fileio.atomic_write_json(layout.summary_path(out_root), {"skipped": why_not})
        out_root.mkdir(parents=True, exist_ok=True)
        return {}
    meta = {"model": model_name, "train_dataset": layout.NO_TRAIN_DATASET, "stage": layout.ZERO_SHOT,
            "surprise": params.evaluate.surprise}
    eval_datasets = list(eval_datasets or []) or prepared_eval_datasets(params, None, size)
    return _evaluate_each(params, out_root, eval_datasets, size, meta, probs_for)
