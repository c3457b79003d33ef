"""Metrics of one (model, eval set) pair, written as plain files DVC reads directly (the
zero-shot mapping of pretrained heads onto the 3 classes is the label contract's: labels.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from ferflow import layout
from ferflow.labels import CLASSES, METRICS
from ferflow.errors import FerflowError
from ferflow.fileio import atomic_path


# ------------------------------------------------------------------------------ metrics


def _class_ids(y: Any, name: str, k: int) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise FerflowError(f"no samples to evaluate ({name} is empty): check that the eval split has images")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= k:
        raise ValueError(f"{name} holds ids outside 0..{k - 1} ({k} classes)")
    return arr.astype(np.int64)


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, macro-F1, balanced accuracy, per-class report and confusion matrix.

    Every class is reported even when absent from y_true or y_pred (0 where undefined), so
    tables of different runs always line up. Confusion rows are true classes, columns predicted.
    """
    k = len(classes)
    t = _class_ids(y_true, "y_true", k)
    p = _class_ids(y_pred, "y_pred", k)
    if len(t) != len(p):
        raise ValueError(f"y_true has {len(t)} labels but y_pred has {len(p)}")
    labels = list(range(k))
    prec, rec, f1, support = precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
    present = support > 0
    return {
        "accuracy": float(accuracy_score(t, p)),
        "macro_f1": float(f1_score(t, p, average="macro", labels=labels, zero_division=0)),
        # Mean recall over the classes that occur, as sklearn's balanced_accuracy_score,
        # without its warning when a predicted class is absent from y_true.
        "balanced_accuracy": float(rec[present].mean()),
        "n": int(len(t)),
        "per_class": {
            cls: {
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, cls in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(t, p, labels=labels).astype(int).tolist(),
    }


# ------------------------------------------------------------------------------- files


def plot_confusion(cm: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str], title: str, path: Path) -> None:
    """PNG of counts and row-normalised % (recall per true class); written atomically."""
    counts = np.asarray(cm, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    k = len(classes)
    # A bare Figure on the Agg canvas: no pyplot state, no backend switch, nothing to close.
    fig = Figure(figsize=(1.6 * k + 2.0, 1.4 * k + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            text = f"{counts[i, j]}\n{100 * share[i, j]:.1f}%" if rows[i, 0] else "0\n–"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels=list(classes))
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="share of true class")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, int, float, np.integer, np.floating, np.bool_))


def _json_value(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; DVC and strict readers refuse it
    return value


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def write_evaluation(
    out_dir: Path,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray | None,
    classes: Sequence[str],
    meta: dict,
    paths: Sequence[str] | None = None,
) -> dict:
    """Write metrics.json (flat, for `dvc metrics show`), per_class.{json,csv},
    confusion.{json,png} and predictions.csv into out_dir; return compute_metrics' dict.

    Files are built in a hidden staging folder inside out_dir and moved in with os.replace,
    metrics.json last and removed first, so an interrupted run never leaves a metrics.json
    beside files from another run. Other files in out_dir are left alone. Non-scalar meta
    values are left out of metrics.json (DVC shows flat scalars only).
    """
    metrics = compute_metrics(y_true, y_pred, classes)
    n, k = metrics["n"], len(classes)
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape != (n, k):
            raise ValueError(f"probs must have shape ({n}, {k}), got {probs.shape}")
    if paths is not None and len(paths) != n:
        raise ValueError(f"paths has {len(paths)} entries for {n} labels")
    clash = sorted(set(meta) & set(METRICS))
    if clash:
        raise ValueError(f"meta keys {clash} would overwrite metrics of the same name")

    flat = {key: metrics[key] for key in METRICS}
    flat.update({key: _json_value(v) for key, v in meta.items() if _scalar(v)})
    names = list(classes)
    table = pd.DataFrame.from_dict(metrics["per_class"], orient="index")
    table.index.name = "class"
    pred: dict[str, Any] = {
        "actual": [names[i] for i in np.asarray(y_true)],
        "predicted": [names[i] for i in np.asarray(y_pred)],
    }
    if paths is not None:
        pred = {"path": [str(p) for p in paths], **pred}
    if probs is not None:
        pred.update({f"p_{cls}": probs[:, i] for i, cls in enumerate(names)})
    title = " · ".join(str(meta[key]) for key in ("model", "train_dataset", "eval_dataset", "stage") if key in meta)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir))
    try:
        _dump_json(staging / layout.PER_CLASS_JSON, metrics["per_class"])
        table.to_csv(staging / layout.PER_CLASS_CSV, float_format="%.6f", lineterminator="\n")
        _dump_json(staging / layout.CONFUSION_JSON, {"classes": names, "matrix": metrics["confusion_matrix"]})
        plot_confusion(metrics["confusion_matrix"], names, title or "confusion matrix", staging / layout.CONFUSION_PNG)
        pd.DataFrame(pred).to_csv(staging / layout.PREDICTIONS, index=False, float_format="%.6f", lineterminator="\n")
        _dump_json(staging / layout.EVAL_METRICS, flat)
        (out_dir / layout.EVAL_METRICS).unlink(missing_ok=True)
        for name in layout.EVALUATION_FILES:  # in order, metrics.json last: it marks a complete set
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metrics
