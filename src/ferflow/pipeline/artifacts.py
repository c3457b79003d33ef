"""A task's outputs for KFP: the stage's files published as artifacts and described for the UI.

The stages write into the artifact folders themselves (`glue.workspace`); what is left is
what KFP shows: artifact metadata (archive digests, model provenance, the registered
version), scalar metrics, the confusion matrix as ClassificationMetrics, the Markdown
gallery of an evaluation's mistakes, the promotion decisions as a task's output, and
copies of the small files another task needs (prepare reports, the results table).
"""

from __future__ import annotations

import base64
import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

from ferflow import layout
from ferflow.config import Params
from ferflow.pipeline import glue


def describe_raw(artifact, fetched) -> None:
    """What fetch put in `raw`, for the KFP UI: each archive's sha256 and where it came from."""
    artifact.metadata["archives"] = {
        r.name: {"sha256": r.sha256, "source": "dvc-remote" if r.from_dvc_remote else "uri"} for r in fetched
    }


def publish_reports(reports, params: Params, datasets: Iterable[str]) -> None:
    """The prepare reports of a training's data: register needs the manifest digests for
    lineage, not the image caches."""
    counts, digests = {}, {}
    for name in datasets:
        src = layout.prepared_dir(params.data.prepared_dir, name) / layout.REPORT
        dest = layout.prepared_dir(reports.path, name) / layout.REPORT
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
        report = json.loads(src.read_text(encoding="utf-8"))
        counts[name], digests[name] = report.get("n_images"), report.get("manifest_sha256")
    reports.metadata.update({"datasets": list(counts), "images": counts, "manifest_sha256": digests})


def publish_model(artifact, run_dir: Path) -> None:
    """Describe a trained run directory (inside the Model artifact) for the KFP UI; the
    resume checkpoint is dropped: no later task resumes from an artifact."""
    run_dir = Path(run_dir)
    (run_dir / layout.LAST).unlink(missing_ok=True)
    weights = (run_dir / layout.WEIGHTS).resolve().relative_to(Path(artifact.path).resolve())
    artifact.metadata.update(_model_metadata(run_dir, str(weights)))


def publish_registered(artifact, run_dir: Path, version) -> None:
    """The registered version as a small Model artifact: its record (the weights stay in
    MLflow, where `mlflow_model_uri` points), described for the KFP UI."""
    record = {
        "registered_model": version.name,
        "version": str(version.version),
        "mlflow_model_uri": f"models:/{version.name}/{version.version}",
        "aliases": sorted(version.aliases or []),
    }
    dest = Path(artifact.path)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "version.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    artifact.metadata.update(_model_metadata(Path(run_dir), layout.WEIGHTS))
    artifact.metadata.update(record)


def _model_metadata(run_dir: Path, weights: str) -> dict:
    from ferflow.tracking.rundir import read_run_ref

    info = layout.read_run_info(run_dir, required=())
    meta = {"format": "safetensors", "weights": weights, "framework": "pytorch"}
    meta.update({k: info[k] for k in ("model", "dataset", "arch", "input_size", "classes", "recipe_hash") if k in info})
    ref = read_run_ref(run_dir)
    if ref:
        meta["mlflow_run_id"] = ref["run_id"]
    return meta


def log_metrics(artifact, values: Mapping[str, Any], prefix: str = "") -> None:
    """Finite numbers only: the KFP UI shows scalars."""
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            artifact.log_metric(f"{prefix}{key}", float(value))


def log_cross_dataset(metrics, summary: Mapping) -> None:
    """`<eval dataset>_<metric>` for every dataset of an evaluation summary."""
    for eval_ds, values in summary.items():
        log_metrics(metrics, {k: v for k, v in values.items() if k != "n"}, prefix=f"{eval_ds}_")


def describe_decisions(decisions) -> str:
    """Promotion decisions into the task log, one line each, and as the task's JSON output."""
    for decision in decisions:
        print(f"{decision.name}: {decision.action}: {decision.reason}")
    return json.dumps([d.as_dict() for d in decisions])


def log_evaluation(metrics, confusion, params: Params, dataset: str, model: str, summary: Mapping) -> None:
    """In-domain accuracy / macro-F1 plus `<eval dataset>_<metric>` for the cross-dataset
    matrix; the in-domain confusion matrix as ClassificationMetrics."""
    log_metrics(metrics, {k: v for k, v in summary.get(dataset, {}).items() if k != "n"})
    log_cross_dataset(metrics, summary)
    root = layout.eval_dir(params.evaluate.out_dir, dataset, model)
    path = layout.eval_cell(root, dataset) / layout.CONFUSION_JSON
    matrix_ = json.loads(path.read_text(encoding="utf-8"))
    confusion.log_confusion_matrix(list(matrix_["classes"]), [list(map(int, row)) for row in matrix_["matrix"]])


EMBED_MAX_BYTES = 1 << 20  # a bigger PNG is named, not inlined: the KFP UI loads a Markdown artifact whole


def _embedded_png(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"_{alt}: not written ({path.name} missing)._"
    data = path.read_bytes()
    if len(data) > EMBED_MAX_BYTES:
        return f"_{alt}: {len(data) // 1024} KiB, too large to show here; see below._"
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})"


def _mlflow_line(params: Params, dataset: str, model: str) -> str:
    """Which MLflow run holds the evaluation's PNGs, as stages.evaluate decides to log them."""
    from ferflow.tracking.rundir import read_run_ref

    ref = read_run_ref(glue.run_dir(params, dataset, model)) or {}
    if not params.tracking.enabled or not ref.get("run_id"):
        why = "tracking.enabled is false" if not params.tracking.enabled else "the training recorded no MLflow run"
        return f"Not logged to MLflow ({why}); the files are in this task's `evaluation` artifact."
    uri, run_id, experiment_id = ref.get("tracking_uri", ""), ref["run_id"], ref.get("experiment_id", "")
    where = f"[{uri}]({uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})" \
        if uri.startswith(("http://", "https://")) and experiment_id else f"`{uri}`"
    return (f"MLflow: run `{run_id}` (`{ref.get('run_name', f'{dataset}/{model}')}`, experiment "
            f"`{ref.get('experiment', '')}`) at {where} holds every evaluation's "
            f"`evaluation/<eval dataset>/{layout.ERRORS_PNG}` and `{layout.CONFUSION_PNG}`.")


def gallery_markdown(params: Params, dataset: str, model: str, summary: Mapping) -> str:
    """The in-domain confusion matrix and error gallery inlined as PNG data URIs (KFP's UI
    renders Markdown, not artifact images), every eval dataset's files named, and the
    MLflow run that holds them too."""
    root = layout.eval_dir(params.evaluate.out_dir, dataset, model)
    cell = layout.eval_cell(root, dataset)
    lines = [f"# {model} trained on {dataset}: where it goes wrong\n"]
    if dataset in summary:
        values = summary[dataset]
        lines.append(f"In-domain ({dataset} eval split, n = {values.get('n', '?')}): accuracy "
                     f"{100 * values['accuracy']:.2f} %, macro-F1 {100 * values['macro_f1']:.2f} %.\n")
        lines.append("## Confusion matrix\n")
        lines.append(_embedded_png(cell / layout.CONFUSION_PNG, f"confusion matrix, {dataset}") + "\n")
        lines.append("## Most confident mistakes per true class\n")
        lines.append(_embedded_png(cell / layout.ERRORS_PNG, f"error gallery, {dataset}") + "\n")
    lines.append("## Every evaluation's files\n")
    lines.append("In this task's `evaluation` artifact:\n")
    in_artifact = layout.eval_dir("", dataset, model)  # relative to the artifact's root
    lines.extend(f"- {eval_ds}: `{(layout.eval_cell(in_artifact, eval_ds) / layout.ERRORS_PNG).as_posix()}`, "
                 f"`{layout.CONFUSION_PNG}`" for eval_ds in summary)
    lines.append("")
    lines.append(_mlflow_line(params, dataset, model) + "\n")
    return "\n".join(lines)


def publish_gallery(markdown, params: Params, dataset: str, model: str, summary: Mapping) -> None:
    path = Path(markdown.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(gallery_markdown(params, dataset, model, summary), encoding="utf-8")


def publish_report(markdown, table, paths: Mapping[str, Path]) -> None:
    shutil.copy2(paths["markdown"], markdown.path)
    shutil.copy2(paths["csv"], table.path)
