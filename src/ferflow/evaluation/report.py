"""The results report: every evaluation's metrics.json gathered into one long table, the
models × datasets table beside the seed's published accuracies and the zero-shot baseline,
and one cross-dataset matrix per model, written as Markdown and CSV. Every row names where
it comes from (`source`): a training run's evaluation files, or a registered version."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

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
COLUMNS = ["stage", "model", "train_dataset", "eval_dataset", "accuracy", "macro_f1", "balanced_accuracy", "n",
           "source"]
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
SOURCE_NOTE = (
    "`run <train dataset>/<model>`: the latest evaluation files of that training run (`ferflow report`). "
    "`models:/<name>/<version>`: the metrics recorded on that registered version when it was registered "
    "(`ferflow report --from-registry`: the champion, else the newest version of each model). The two differ "
    "when a run was retrained or re-evaluated after its version was registered, or when the champion is an older "
    "version than the run's latest; `ferflow registry` lists every version.\n"
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
        source = f"run {train_dataset}/{model}" if stage == layout.FINE_TUNED else f"zero-shot {model}"
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
                "source": source,
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
                          "n": int(values.get("n", 0)), "source": f"run {path.parent.name}/{path.stem}"}
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


def markdown_table(header: list[str], rows: list[list[str]], numeric_from: int = 1, text_last: bool = False) -> str:
    """A GitHub Markdown table; columns from numeric_from on are right-aligned, but for the
    last with `text_last` (a source column, say)."""
    numeric_to = len(header) - 1 if text_last else len(header)
    align = ["---:" if numeric_from <= i < numeric_to else "---" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(_cell(c) for c in line) + " |" for line in lines) + "\n"


def _sources(df: pd.DataFrame) -> dict[tuple, str]:
    """(stage, model, train dataset, eval dataset) -> where the row comes from."""
    if "source" not in df.columns:
        return {}
    return {(r.stage, r.model, r.train_dataset, r.eval_dataset): str(r.source) for r in df.itertuples(index=False)}


def render_markdown(df: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """The report; `notes`: why figures differ from another source (`compare_with_files`)."""
    parts = ["# Results\n", f"{NOTE}\n"]
    if df.empty:
        return "\n".join([*parts, "No evaluation results found.\n"])
    table, sources = results_table(df), _sources(df)
    rows = []
    for dataset in table.columns.get_level_values("dataset").unique():
        for model, values in table[dataset].iterrows():
            if pd.isna(values["ours"]) and pd.isna(values["zero_shot"]):
                continue
            rows.append(
                [dataset, model, _pct(values["ours"]), _pct(values["seed"]), _delta(values["ours_minus_seed"]),
                 _pct(values["zero_shot"]), _delta(values["ours_minus_zero_shot"]),
                 _pct(values["ours_f1"]), _pct(values["zero_shot_f1"]), _delta(values["ours_minus_zero_shot_f1"]),
                 sources.get((layout.FINE_TUNED, model, dataset, dataset))
                 or sources.get((layout.ZERO_SHOT, model, layout.NO_TRAIN_DATASET, dataset), MISSING)]
            )
    parts.append("## Accuracy and macro-F1 (%) on each dataset's eval split\n")
    parts.append(
        '"ours": fine-tuned and evaluated on the same dataset; "seed": the seed\'s published accuracy '
        'for the same checkpoint; "zero-shot": the pretrained head mapped to the 3 classes, no training '
        '(the starting point a promoted model must beat). The seed reports accuracy only; macro-F1 is '
        'given beside it because the classes are imbalanced.\n'
    )
    header = ["dataset", "model", "ours", "seed", "ours − seed", "zero-shot", "ours − zero-shot",
              "ours F1", "zero-shot F1", "ours − zero-shot F1", "from"]
    parts.append(markdown_table(header, rows, numeric_from=2, text_last=True))
    parts.append(f'"from": where "ours" (else "zero-shot") comes from. {SOURCE_NOTE}')
    if notes:
        parts.append("## Registry and evaluation files differ\n")
        parts.append("".join(f"- {note}\n" for note in notes))
    tuned_models = sorted(set(df.loc[df["stage"] == layout.FINE_TUNED, "model"]))
    if tuned_models:
        parts.append("## Cross-dataset accuracy (%)\n")
        parts.append("Rows: dataset trained on; columns: dataset evaluated on (eval split). Diagonal: in-domain.\n")
    for model in tuned_models:
        matrix = cross_dataset_matrix(df, model)
        body = [[train, *(_pct(v) for v in values),
                 next((v for k, v in sources.items() if k[:3] == (layout.FINE_TUNED, model, train)), MISSING)]
                for train, values in matrix.iterrows()]
        parts.append(f"### {model}\n")
        header = ["trained on ↓ / evaluated on →", *matrix.columns, "from"]
        parts.append(markdown_table(header, body, text_last=True))
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


def compare_with_files(registry: pd.DataFrame, eval_root: Path) -> list[str]:
    """One note per registered (train dataset, model) whose fine-tuned figures differ from
    the latest evaluation files under `eval_root`, naming both sources and saying why they
    can; [] when they agree or there are no files here to compare with."""
    if not Path(eval_root).is_dir():
        return []
    try:
        files = collect_results(eval_root)
    except FerflowError as exc:
        return [f"the evaluation files were not compared: {exc}"]
    keys = ["model", "train_dataset", "eval_dataset"]
    both = registry[registry["stage"] == layout.FINE_TUNED].merge(
        files[files["stage"] == layout.FINE_TUNED], on=keys, suffixes=("_registry", "_files"))
    both = both[(both["accuracy_registry"] - both["accuracy_files"]).abs() > 1e-9]
    notes = []
    for (model, train), group in both.groupby(["model", "train_dataset"], sort=True):
        registered = ", ".join(f"{100 * r.accuracy_registry:.2f} % on {r.eval_dataset}" for r in group.itertuples())
        latest = ", ".join(f"{100 * r.accuracy_files:.2f} %" for r in group.itertuples())
        notes.append(
            f"`{train}/{model}` accuracy: {group['source_registry'].iloc[0]} records {registered}; the latest "
            f"evaluation files ({group['source_files'].iloc[0]}) show {latest}. The registry keeps the metrics a "
            "version was registered with; the "
            "files hold the run's latest evaluation, so the run was retrained or re-evaluated after that version was "
            "registered (or the version shown is an older champion). `ferflow register` makes a version of the run "
            "as it is now; `ferflow promote` decides whether it serves.")
    return notes


def write_report(df: pd.DataFrame, out_dir: Path, notes: Sequence[str] = ()) -> dict[str, Path]:
    """results.md (tables, with `notes`) and results.csv (the long table, fractions) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / layout.RESULTS_MD, "csv": out / layout.RESULTS_CSV}
    atomic_write_text(paths["markdown"], render_markdown(df, notes))
    atomic_write_text(paths["csv"], df.to_csv(index=False, lineterminator="\n"))
    return paths
