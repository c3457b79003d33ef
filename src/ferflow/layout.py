"""The on-disk layout: every file and folder name ferflow's stages write and read, and the
reader of run.json. The one place these names live; dvc.yaml's outs spell the same paths.

    <data.prepared_dir>/<dataset>/                      prepared_dir()
        manifest.parquet, report.json                   (cache/<size>/: ferflow.data.cache)
    <train.out_dir>/<dataset>/<model>/                  run_dir() (<model>: model_dir_name())
        run.json, best.safetensors, last.pt, history.json, history.csv,
        train_metrics.json, mlflow_run.json
    <evaluate.out_dir>/fine-tuned/<dataset>/<model>/    eval_dir()
    <evaluate.out_dir>/zero-shot/none/<model>/          zero_shot_dir()
        <eval dataset>/                                 eval_cell(): EVALUATION_FILES, errors.png
        ../<model>.json                                 summary_path(): DVC metrics
        ../<model>.predictions.csv                      predictions_plot_path(): DVC plot (fine-tuned)
    <report.out_dir>/results.md, results.csv
    <registry.records_dir>/<dataset>/<model>.json       registry_record(): what register did
    <registry.records_dir>/promotions/<dataset>.json    promotion_record(): what promote decided

A leaf module (stdlib and ferflow.errors only): models, tracking and serving read a run
without importing training or torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

from ferflow.errors import FerflowError

PathLike = Union[str, Path]

# ---------------------------------------------------------------- fetched archives (data.raw_dir)
DIGEST_RECORD_SUFFIX = ".sha256.json"  # the digest fetch recorded for a local source without one


def archive_name(name: str) -> str:
    """`<name>.zip`: the file fetch writes for archive `name` (a DVC out of stage fetch@name)."""
    return f"{name}.zip"


def raw_archive(raw_dir: PathLike, name: str) -> Path:
    return Path(raw_dir) / archive_name(name)


def digest_record(raw_dir: PathLike, name: str) -> Path:
    return Path(raw_dir) / f"{name}{DIGEST_RECORD_SUFFIX}"


# ---------------------------------------------------------------- prepared dataset folder
MANIFEST = "manifest.parquet"  # one row per kept image
REPORT = "report.json"  # counts, quarantine, digests (lineage reads it)

# --------------------------------------------------------------------- run directory
RUN_JSON = "run.json"  # what was trained (trainer) and how to feed it (models.inference)
WEIGHTS = "best.safetensors"  # weights of the best validation epoch: evaluated and registered
LAST = "last.pt"  # full training state after the last finished epoch (resume)
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
TRAIN_METRICS = "train_metrics.json"  # best validation metrics (a DVC metrics file)
MLFLOW_RUN = "mlflow_run.json"  # the MLflow run of the training (tracking.runs writes it)
RUN_FILES = (HISTORY_JSON, HISTORY_CSV, TRAIN_METRICS)  # logged as the training run's artifacts

# ------------------------------------------------------------------- evaluation folders
# The folder names are also the `stage` of every evaluation (metrics.json, the report).
FINE_TUNED = "fine-tuned"
ZERO_SHOT = "zero-shot"
STAGES = (FINE_TUNED, ZERO_SHOT)
NO_TRAIN_DATASET = "none"  # the train dataset of a zero-shot evaluation

EVAL_METRICS = "metrics.json"
PER_CLASS_JSON = "per_class.json"
PER_CLASS_CSV = "per_class.csv"
CONFUSION_JSON = "confusion.json"
CONFUSION_PNG = "confusion.png"
PREDICTIONS = "predictions.csv"
ERRORS_PNG = "errors.png"  # the error gallery, written after the set below
# What evaluation.metrics.write_evaluation writes, in order: metrics.json goes last, its
# presence marks a complete set (the report reads only it).
EVALUATION_FILES = (PER_CLASS_JSON, PER_CLASS_CSV, CONFUSION_JSON, CONFUSION_PNG, PREDICTIONS, EVAL_METRICS)

# ----------------------------------------------------------------------------- report
RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"

# --------------------------------------------------------------------- registry records
PROMOTIONS = "promotions"


def model_dir_name(model: str) -> str:
    """The file-name form of a model name, used by every path below: `timm:resnet18` ->
    `timm-resnet18`. A `:` is refused by Windows file systems and misread by tools that
    take `host:path` or `file:stage` (scp, rsync, DVC addressing); zoo names have none,
    and the zoo accepts this form as the same model."""
    return model.replace(":", "-")


def prepared_dir(prepared_root: PathLike, dataset: str) -> Path:
    """`<data.prepared_dir>/<dataset>`: what prepare writes for one dataset."""
    return Path(prepared_root) / dataset


def run_dir(train_out_dir: PathLike, dataset: str, model: str) -> Path:
    """`<train.out_dir>/<dataset>/<model>`: where training writes (and everything after reads) a run."""
    return Path(train_out_dir) / dataset / model_dir_name(model)


def eval_dir(evaluate_out_dir: PathLike, dataset: str, model: str) -> Path:
    """`<evaluate.out_dir>/fine-tuned/<dataset>/<model>`: the evaluation of the run trained on `dataset`."""
    return Path(evaluate_out_dir) / FINE_TUNED / dataset / model_dir_name(model)


def zero_shot_dir(evaluate_out_dir: PathLike, model: str) -> Path:
    """`<evaluate.out_dir>/zero-shot/none/<model>`: the pretrained head, before fine-tuning."""
    return Path(evaluate_out_dir) / ZERO_SHOT / NO_TRAIN_DATASET / model_dir_name(model)


def eval_cell(eval_root: PathLike, eval_dataset: str) -> Path:
    """The evaluation files of one eval dataset under an eval_dir/zero_shot_dir."""
    return Path(eval_root) / eval_dataset


def summary_path(eval_root: PathLike) -> Path:
    """`<model>.json` beside the model's evaluation folder: DVC metrics may not sit inside an output."""
    eval_root = Path(eval_root)
    return eval_root.with_name(f"{eval_root.name}.json")


def predictions_plot_path(eval_root: PathLike) -> Path:
    """`<model>.predictions.csv` beside the folder: the in-domain predictions for DVC's confusion plot."""
    eval_root = Path(eval_root)
    return eval_root.with_name(f"{eval_root.name}.{PREDICTIONS}")


def registry_record(records_dir: PathLike, dataset: str, model: str) -> Path:
    """`<registry.records_dir>/<dataset>/<model>.json`: the version `register` made (a DVC out)."""
    return Path(records_dir) / dataset / f"{model_dir_name(model)}.json"


def promotion_record(records_dir: PathLike, dataset: str) -> Path:
    """`<registry.records_dir>/promotions/<dataset>.json`: the decision `promote` made (a DVC out)."""
    return Path(records_dir) / PROMOTIONS / f"{dataset}.json"


def trained_files(run_dir: PathLike) -> tuple[Path, Path]:
    """(run.json, best.safetensors) of a finished training; FerflowError when either is missing."""
    run_dir = Path(run_dir)
    info, weights = run_dir / RUN_JSON, run_dir / WEIGHTS
    if not info.is_file() or not weights.is_file():
        raise FerflowError(f"{run_dir}: no trained model ({RUN_JSON} / {WEIGHTS} missing); run `ferflow train` first")
    return info, weights


def read_run_info(run_dir: PathLike, required: Sequence[str] = ("model", "input_size")) -> dict:
    """`<run_dir>/run.json` as a dict, with the keys in `required`; one FerflowError naming
    the file when it is missing, unreadable, not a JSON object or lacks one of them."""
    return read_run_json(Path(run_dir) / RUN_JSON, required)


def read_run_json(path: PathLike, required: Sequence[str] = ("model", "input_size")) -> dict:
    """A run.json wherever it sits (a run directory, a registered version's artifacts)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FerflowError(f"{path}: missing; not a finished training run (run `ferflow train` first)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FerflowError(f"{path}: unreadable ({exc}); re-run `ferflow train`") from None
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise FerflowError(f"{path}: not valid JSON ({exc}); re-run `ferflow train`") from None
    if not isinstance(info, dict):
        raise FerflowError(f"{path}: expected a JSON object, got {type(info).__name__}; re-run `ferflow train`")
    missing = [k for k in required if k not in info]
    if missing:
        raise FerflowError(f"{path}: missing {', '.join(missing)}; written by an older ferflow? re-run `ferflow train`")
    return info
