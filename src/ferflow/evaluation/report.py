"""The results report: every evaluation's metrics.json gathered into one long table, the
models × datasets table beside the seed's published accuracies and the zero-shot baseline,
and one cross-dataset matrix per model, written as Markdown and CSV."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ferflow import layout
from ferflow.errors import FerflowError
from ferflow.fileio import atomic_write_text

# The seed project's published accuracies (%) with a 3-class head on each HSEmotion
# checkpoint, on the real archives (shared/design/FACTS.md, "The seed's results").
SEED_RESULTS: dict[str, dict[str, float]] = {
    "enet_b0_7": {"LFW-FER": 87.4676, "M-LFW-FER": 38.6147, "M-LFW-FER-face-cut": 71.4757},
    "enet_b0_8_best_afew": {"LFW-FER": 87.3812, "M-LFW-FER": 41.5584, "M-LFW-FER-face-cut": 76.5870},
    "enet_b0_8_best_vgaf": {"LFW-FER": 86.6033, "M-LFW-FER": 57.2294, "M-LFW-FER-face-cut": 75.5153},
    "enet_b0_8_va_mtl": {"LFW-FER": 87.6404, "M-LFW-FER": 47.0996, "M-LFW-FER-face-cut": 76.8343},
    "enet_b2_8": {"LFW-FER": 87.4676, "M-LFW-FER": 56.1039, "M-LFW-FER-face-cut": 76.9167},
}
DATASET_ORDER = ("LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut")
COLUMNS = ["stage", "model", "train_dataset", "eval_dataset", "accuracy", "macro_f1", "balanced_accuracy", "n"]
QUANTITIES = ("ours", "seed", "zero_shot", "ours_minus_seed", "ours_minus_zero_shot",
              "ours_f1", "zero_shot_f1", "ours_minus_zero_shot_f1")
MISSING = "–"
NOTE = (
    "The seed's numbers were measured on the real LFW emotion archives "
    "(KDDI-AI-Center/LFW-emotion-dataset). Results on any other data, such as the stand-in "
    "set or the generated demo archives (which reuse the archive names), are not comparable "
    "with them, and neither are the deltas against them."
)
GALLERY_NOTE = (
    "The most confident mistakes per true class, as faces: `errors.png` beside `confusion.png` in each "
    "evaluation's folder, both also logged to the training's MLflow run (named `<train dataset>/<model>`) "
    "under `evaluation/<eval dataset>/`; in Kubeflow, each evaluate task's `gallery` output shows the in-domain pair.\n"
)


# ------------------------------------------------------------------------------ collect


def _number(data: dict, key: str, path: Path) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FerflowError(f"{path}: {key!r} is missing or not a number; re-run this evaluation")
    return float(value)


def collect_results(eval_root: Path) -> pd.DataFrame:
    """Long table of every eval_root/<stage>/<train_dataset>/<model>/<eval_dataset>/metrics.json.

    The folders name the run (they are the layout the evaluate stage writes); accuracy and
    macro_f1 stay fractions as in metrics.json. Hidden folders (writes in progress) are skipped.
    """
    root = Path(eval_root)
    if not root.is_dir():
        raise FerflowError(f"{root}: no evaluation results folder; run the evaluate stage first")
    rows = []
    for path in sorted(root.rglob(layout.EVAL_METRICS)):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if len(rel.parts) != 5 or rel.parts[0] not in layout.STAGES:
            raise FerflowError(
                f"{path}: expected <stage>/<train_dataset>/<model>/<eval_dataset>/metrics.json "
                f"under {root} with stage one of {', '.join(layout.STAGES)}; move or delete this file"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FerflowError(f"{path}: unreadable metrics file ({exc}); re-run this evaluation") from exc
        if not isinstance(data, dict):
            raise FerflowError(f"{path}: expected a JSON object; re-run this evaluation")
        stage, train_dataset, model, eval_dataset, _ = rel.parts
        balanced = data.get("balanced_accuracy")
        rows.append(
            {
                "stage": stage,
                "model": model,
                "train_dataset": train_dataset,
                "eval_dataset": eval_dataset,
                "accuracy": _number(data, "accuracy", path),
                "macro_f1": _number(data, "macro_f1", path),
                "balanced_accuracy": float(balanced) if isinstance(balanced, (int, float)) else math.nan,
                "n": int(_number(data, "n", path)),
            }
        )
    rows.extend(_baselines(root, {(r["model"], r["eval_dataset"]) for r in rows if r["stage"] == layout.ZERO_SHOT}))
    return pd.DataFrame(rows, columns=COLUMNS)


def _baselines(root: Path, have: set[tuple[str, str]]) -> list[dict]:
    """Zero-shot rows from the starting points that fine-tuned evaluations record
    (`baseline_*` in `fine-tuned/<train>/<model>.json`), where no zero-shot stage ran."""
    found: dict[tuple[str, str], dict] = {}
    for path in sorted((root / layout.FINE_TUNED).glob("*/*.json")):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # the metrics.json files of that evaluation are read and checked above
        for eval_dataset, values in summary.items() if isinstance(summary, dict) else ():
            key = (path.stem, eval_dataset)
            if key in have or not isinstance(values, dict) or "baseline_accuracy" not in values:
                continue
            found[key] = {"stage": layout.ZERO_SHOT, "model": path.stem, "train_dataset": layout.NO_TRAIN_DATASET,
                          "eval_dataset": eval_dataset, "accuracy": _number(values, "baseline_accuracy", path),
                          "macro_f1": _number(values, "baseline_macro_f1", path), "balanced_accuracy": math.nan,
                          "n": int(values.get("n", 0))}
    return [found[k] for k in sorted(found)]


# ------------------------------------------------------------------------------- tables


def _ordered(datasets: set[str]) -> list[str]:
    """The archives in their published order, then any others alphabetically."""
    return [d for d in DATASET_ORDER if d in datasets] + sorted(datasets - set(DATASET_ORDER))


def seed_accuracy(model: str, dataset: str) -> float:
    """The seed's accuracy (%) for a checkpoint name (with or without .pt), NaN if unpublished."""
    return SEED_RESULTS.get(model.removesuffix(".pt"), {}).get(dataset, math.nan)


def results_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows: model; columns (dataset, quantity) with quantity in QUANTITIES; accuracy in %.

    "ours" is the in-domain fine-tuned result (trained and evaluated on the same dataset).
    """
    tuned = df[(df["stage"] == layout.FINE_TUNED) & (df["train_dataset"] == df["eval_dataset"])]
    zero = df[df["stage"] == layout.ZERO_SHOT]
    models = sorted(set(tuned["model"]) | set(zero["model"]))
    datasets = _ordered(set(tuned["eval_dataset"]) | set(zero["eval_dataset"]))
    columns = pd.MultiIndex.from_product([datasets, QUANTITIES], names=["dataset", "quantity"])
    table = pd.DataFrame(np.nan, index=pd.Index(models, name="model"), columns=columns)
    for source, quantity in ((tuned, "ours"), (zero, "zero_shot")):
        for row in source.itertuples(index=False):
            table.loc[row.model, (row.eval_dataset, quantity)] = 100.0 * row.accuracy
            table.loc[row.model, (row.eval_dataset, f"{quantity}_f1")] = 100.0 * row.macro_f1
    for model in models:
        for dataset in datasets:
            table.loc[model, (dataset, "seed")] = seed_accuracy(model, dataset)
    for dataset in datasets:
        ours = table[(dataset, "ours")]
        table[(dataset, "ours_minus_seed")] = ours - table[(dataset, "seed")]
        table[(dataset, "ours_minus_zero_shot")] = ours - table[(dataset, "zero_shot")]
        table[(dataset, "ours_minus_zero_shot_f1")] = table[(dataset, "ours_f1")] - table[(dataset, "zero_shot_f1")]
    return table


def cross_dataset_matrix(df: pd.DataFrame, model: str) -> pd.DataFrame:
    """Fine-tuned accuracy (%) of one model: rows train dataset, columns eval dataset.

    Square over every dataset the model was trained or evaluated on, NaN where not run.
    """
    tuned = df[(df["stage"] == layout.FINE_TUNED) & (df["model"] == model)]
    if tuned.empty:
        known = ", ".join(sorted(set(df.loc[df["stage"] == layout.FINE_TUNED, "model"]))) or "none"
        raise FerflowError(f"no fine-tuned results for model {model!r} (models with results: {known})")
    datasets = _ordered(set(tuned["train_dataset"]) | set(tuned["eval_dataset"]))
    matrix = pd.DataFrame(
        np.nan, index=pd.Index(datasets, name="train_dataset"), columns=pd.Index(datasets, name="eval_dataset")
    )
    for row in tuned.itertuples(index=False):
        matrix.loc[row.train_dataset, row.eval_dataset] = 100.0 * row.accuracy
    return matrix


# ----------------------------------------------------------------------------- markdown


def _pct(x: float) -> str:
    return MISSING if pd.isna(x) else f"{x:.2f}"


def _delta(x: float) -> str:
    if pd.isna(x):
        return MISSING
    x = round(float(x), 2) + 0.0  # + 0.0 turns -0.0 into 0.0: no "−0.00"
    return f"{x:+.2f}".replace("-", "\u2212")


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    """A GitHub Markdown table; columns from numeric_from on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(_cell(c) for c in line) + " |" for line in lines) + "\n"


def render_markdown(df: pd.DataFrame) -> str:
    parts = ["# Results\n", f"{NOTE}\n"]
    if df.empty:
        return "\n".join([*parts, "No evaluation results found.\n"])
    table = results_table(df)
    rows = []
    for dataset in table.columns.get_level_values("dataset").unique():
        for model, values in table[dataset].iterrows():
            if pd.isna(values["ours"]) and pd.isna(values["zero_shot"]):
                continue
            rows.append(
                [dataset, model, _pct(values["ours"]), _pct(values["seed"]), _delta(values["ours_minus_seed"]),
                 _pct(values["zero_shot"]), _delta(values["ours_minus_zero_shot"]),
                 _pct(values["ours_f1"]), _pct(values["zero_shot_f1"]), _delta(values["ours_minus_zero_shot_f1"])]
            )
    parts.append("## Accuracy and macro-F1 (%) on each dataset's eval split\n")
    parts.append(
        '"ours": fine-tuned and evaluated on the same dataset; "seed": the seed\'s published accuracy '
        'for the same checkpoint; "zero-shot": the pretrained head mapped to the 3 classes, no training '
        '(the starting point a promoted model must beat). The seed reports accuracy only; macro-F1 is '
        'given beside it because the classes are imbalanced.\n'
    )
    header = ["dataset", "model", "ours", "seed", "ours − seed", "zero-shot", "ours − zero-shot",
              "ours F1", "zero-shot F1", "ours − zero-shot F1"]
    parts.append(markdown_table(header, rows, numeric_from=2))
    tuned_models = sorted(set(df.loc[df["stage"] == layout.FINE_TUNED, "model"]))
    if tuned_models:
        parts.append("## Cross-dataset accuracy (%)\n")
        parts.append("Rows: dataset trained on; columns: dataset evaluated on (eval split). Diagonal: in-domain.\n")
    for model in tuned_models:
        matrix = cross_dataset_matrix(df, model)
        body = [[train, *(_pct(v) for v in values)] for train, values in matrix.iterrows()]
        parts.append(f"### {model}\n")
        parts.append(markdown_table(["trained on ↓ / evaluated on →", *matrix.columns], body))
    runs = df.loc[df["stage"] == layout.FINE_TUNED, ["train_dataset", "model", "eval_dataset"]]
    if not runs.empty:
        parts.append("## Error galleries\n")
        parts.append(GALLERY_NOTE)
        parts.append("".join(
            f"- `{train}/{model}`: `{layout.eval_dir('evaluation', train, model).as_posix()}/<eval dataset>/"
            f"{layout.ERRORS_PNG}` for "
            f"{', '.join(_ordered(set(group['eval_dataset'])))}\n"
            for (train, model), group in runs.groupby(["train_dataset", "model"], sort=True)))
    return "\n".join(parts)


def write_report(df: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """results.md (tables) and results.csv (the long table, fractions) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / layout.RESULTS_MD, "csv": out / layout.RESULTS_CSV}
    atomic_write_text(paths["markdown"], render_markdown(df))
    atomic_write_text(paths["csv"], df.to_csv(index=False, lineterminator="\n"))
    return paths
