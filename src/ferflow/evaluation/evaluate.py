"""Evaluate fine-tuned runs (and pretrained heads zero-shot) on the eval split of every
dataset: the cross-dataset matrix, written as files per (model, train set, eval set).

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

from ferflow.config import Params
from ferflow.data.cache import CachedSplit
from ferflow.labels import CLASSES
from ferflow.data.loader import CacheLoader, EpochBatchSampler
from ferflow.errors import FerflowError
from ferflow.evaluation.metrics import collapse_probs, compute_metrics, write_evaluation
from ferflow.labels import source_mapping
from ferflow.training import checkpoint as ckpt
from ferflow.training.augment import Normalize
from ferflow.training.runtime import select_device
from ferflow.training.trainer import RUN_JSON, forward_logits, run_dir_for

log = logging.getLogger(__name__)


def load_run(run_dir: Path, device: torch.device):
    """The fine-tuned model of a run directory, ready for inference, and its run.json."""
    from ferflow.models import zoo

    run_dir = Path(run_dir)
    info_path, weights = run_dir / RUN_JSON, run_dir / ckpt.BEST
    if not info_path.is_file() or not weights.is_file():
        raise FerflowError(f"{run_dir}: no trained model (run.json / {ckpt.BEST} missing); run `ferflow train` first")
    info = json.loads(info_path.read_text())
    entry = zoo.resolve(info["model"])
    model = zoo.build_finetuned(entry, ckpt.load_weights(weights), len(CLASSES))
    return model.to(device).eval(), entry, info


@torch.no_grad()
def predict(model, entry, split: CachedSplit, batch_size: int, device: torch.device, head=None) -> np.ndarray:
    """Softmax probabilities for every image of a cached split, in cache order."""
    from ferflow.models import zoo

    cfg = zoo.data_config(entry)
    normalize = Normalize(cfg["mean"], cfg["std"], device)
    loader = CacheLoader(split, EpochBatchSampler(len(split), batch_size, shuffle=False), workers=1)
    out = []
    for images, _labels in loader:  # labels come sorted with images; order is the cache order
        x = normalize(images.to(device)).contiguous(memory_format=torch.channels_last)
        logits = head(model, x) if head is not None else forward_logits(model, x)[0]
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(CLASSES)))


def _manifest_paths(data_dir: Path, split: str) -> list[str]:
    manifest = pd.read_parquet(data_dir / "manifest.parquet", columns=["path", "split", "cache_index"])
    return manifest[manifest["split"] == split].sort_values("cache_index")["path"].tolist()


def evaluate_run(params: Params, dataset: str, model_name: str, eval_datasets: Optional[Iterable[str]] = None) -> dict:
    """Evaluate the run trained on `dataset` on the eval split of each eval dataset, beside
    the zero-shot result of the checkpoint it started from on the same images
    (`baseline_accuracy`, `baseline_macro_f1`): promotion refuses a model below it."""
    device = select_device(params.require_train().device)
    run_dir = run_dir_for(params, dataset, model_name)
    model, entry, info = load_run(run_dir, device)
    size = info["input_size"]
    out_root = params.evaluate.out_dir / "fine-tuned" / dataset / model_name
    meta = {"model": model_name, "train_dataset": dataset, "stage": "fine-tuned", "input_size": size}
    eval_datasets = eval_datasets_for(params, dataset) if eval_datasets is None else eval_datasets
    baseline = _zero_shot_predictor(params, model_name, device, expected_sha256=info.get("weights_sha256"))
    summary = _evaluate_each(params, out_root, eval_datasets, size, meta,
                             lambda split: predict(model, entry, split, params.evaluate.batch_size, device),
                             baseline)
    if dataset in summary:  # in-domain predictions, for DVC's confusion-matrix plot
        in_domain = out_root / dataset / "predictions.csv"
        ckpt.atomic_write_bytes(out_root.with_name(f"{model_name}.predictions.csv"), in_domain.read_bytes())
    return summary


def eval_datasets_for(params: Params, dataset: Optional[str] = None) -> list[str]:
    """Every archive's eval split; a union's own (all members' eval images) is added for a
    model trained on that union: its in-domain result."""
    names = list(params.data.archives)
    return [*names, dataset] if dataset in params.data.unions else names


def _evaluate_each(params: Params, out_root: Path, eval_datasets: Optional[Iterable[str]], size: int,
                   meta: dict, probs_for, baseline=None) -> dict:
    """Probabilities from `probs_for(split)` on each dataset's eval split, written as
    evaluation files under `out_root/<dataset>/`, plus the summary beside `out_root`;
    with `baseline` (a zero-shot `probs_for`), its accuracy and macro-F1 on the same split."""
    summary = {}
    for eval_ds in eval_datasets or eval_datasets_for(params):
        data_dir = params.data.prepared_dir / eval_ds
        split = CachedSplit(data_dir, params.evaluate.split, size)
        probs = probs_for(split)
        metrics = write_evaluation(
            out_root / eval_ds, split.labels, probs.argmax(1), probs, CLASSES,
            {**meta, "eval_dataset": eval_ds, "split": params.evaluate.split},
            paths=_manifest_paths(data_dir, params.evaluate.split),
        )
        summary[eval_ds] = {k: metrics[k] for k in ("accuracy", "macro_f1", "n")}
        if baseline is not None:
            before = compute_metrics(split.labels, baseline(split).argmax(1), CLASSES)
            summary[eval_ds].update({f"baseline_{k}": before[k] for k in ("accuracy", "macro_f1")})
    ckpt.atomic_write_json(summary_path(out_root), summary)
    return summary


def summary_path(out_root: Path) -> Path:
    """`<model>.json` beside the model's folder: DVC metrics may not sit inside an output."""
    return out_root.with_name(f"{out_root.name}.json")


def _zero_shot_skip_reason(params: Params, entry, pretrained: str) -> Optional[str]:
    if not entry.classes:
        return "the model has no pretrained facial-expression head"
    if pretrained.strip().lower() in ("", "none"):
        return f"models.{entry.name}.pretrained is none"
    return None


def _zero_shot_predictor(params: Params, model_name: str, device: torch.device,
                         expected_sha256: Optional[str] = None):
    """`probs_for(split)` of the pretrained head mapped to 3 classes, or None when the model
    has no expression head or no weights (nothing to compare against)."""
    from ferflow.models import zoo
    from ferflow.models.weights import load_pretrained
    from ferflow.training.trainer import _weights_cache

    entry = zoo.resolve(model_name)
    weights_cfg = params.weights_for(model_name)
    why_not = _zero_shot_skip_reason(params, entry, weights_cfg.pretrained)
    if why_not:
        log.info("%s: no zero-shot evaluation: %s", model_name, why_not)
        return None
    try:
        pretrained = load_pretrained(weights_cfg.pretrained, _weights_cache(), expected_sha256 or weights_cfg.sha256,
                                     params.fetch)
    except FerflowError as exc:
        if expected_sha256 is None:
            raise
        raise FerflowError(f"cannot evaluate the starting point of {model_name}: models.{model_name}.pretrained is "
                           f"not the checkpoint the run started from (sha256 {expected_sha256[:16]}…): {exc}") from None
    model = zoo.build_model(entry, pretrained=pretrained).to(device).eval()
    mapping = source_mapping(entry.classes, params.evaluate.surprise)
    head = lambda m, x: zoo.zero_shot_forward(m, entry, x)  # noqa: E731
    return lambda split: collapse_probs(predict(model, entry, split, params.evaluate.batch_size, device, head=head),
                                        mapping)


def evaluate_zero_shot(params: Params, model_name: str, eval_datasets: Optional[Iterable[str]] = None) -> dict:
    """The pretrained 7/8-class head mapped to 3 classes, before any fine-tuning."""
    from ferflow.models import zoo

    entry = zoo.resolve(model_name)
    out_root = params.evaluate.out_dir / "zero-shot" / "none" / model_name
    device = select_device(params.require_train().device)
    probs_for = _zero_shot_predictor(params, model_name, device) if params.evaluate.zero_shot else None
    if probs_for is None:
        # A DAG runs this stage for every model; one without an expression head has no
        # "before fine-tuning" row, which is recorded rather than failed.
        why_not = ("evaluate.zero_shot is false" if not params.evaluate.zero_shot
                   else _zero_shot_skip_reason(params, entry, params.weights_for(model_name).pretrained))
        ckpt.atomic_write_json(summary_path(out_root), {"skipped": why_not})
        out_root.mkdir(parents=True, exist_ok=True)
        return {}
    size = zoo.input_size(model_name, params.require_train().input_size)
    meta = {"model": model_name, "train_dataset": "none", "stage": "zero-shot", "surprise": params.evaluate.surprise}
    return _evaluate_each(params, out_root, eval_datasets, size, meta, probs_for)
