"""Reading the model registry and evaluations back: a registered model's versions and
aliases, the evaluation a version is registered with (from the evaluate stage's files or
the training run's metrics), and the report's results table built from the registry.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ferflow import layout
from ferflow.config import Params
from ferflow.errors import FerflowError
from ferflow.tracking import service
from ferflow.tracking.eval_logging import EVAL_KEYS, evaluation_records
from ferflow.tracking.promotion import CHAMPION

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


@dataclass(frozen=True)
class Evaluation:
    """An evaluation as a version records it (the names `eval_logging.evaluation_records` gives)."""

    metrics: dict  # eval_<metric> (in-domain) and eval_<dataset>_<metric>
    tags: dict  # eval.split, eval.datasets, eval.manifest_sha256, eval.<dataset>.manifest_sha256

    @property
    def datasets(self) -> list[str]:
        return eval_datasets(self.tags)

    def per_dataset(self) -> dict[str, dict]:
        return per_dataset(self.metrics, self.datasets)


def eval_datasets(tags: dict) -> list[str]:
    """The evaluated datasets named by the `eval.datasets` tag."""
    return [d for d in tags.get("eval.datasets", "").split(",") if d]


def per_dataset(values: dict, datasets: list[str]) -> dict[str, dict]:
    """dataset -> {metric: value} from `eval_<dataset>_<metric>` entries (metrics or version
    tags); datasets without an accuracy are left out."""
    out = {}
    for ds in datasets:
        found = {}
        for metric in EVAL_KEYS:
            try:
                found[metric] = float(values[f"eval_{ds}_{metric}"])
            except (KeyError, ValueError):
                continue
        if "accuracy" in found:
            out[ds] = found
    return out


def evaluation_files(params: Params, dataset: str, model: str) -> Optional[Evaluation]:
    """The evaluate stage's summary (`<model>.json`) and per-dataset metrics.json, named
    like the training run's metrics; None when not evaluated."""
    root = layout.eval_dir(params.evaluate.out_dir, dataset, model)
    summary = layout.summary_path(root)
    if not summary.is_file():
        return None
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
        metrics, tags = evaluation_records(params, dataset, data, root)
    except (ValueError, AttributeError, TypeError) as exc:
        raise FerflowError(f"{summary}: unreadable evaluation summary ({exc}); re-run `ferflow evaluate`") from None
    if "eval_accuracy" not in metrics:
        raise FerflowError(f"{summary}: no in-domain ({dataset}) result; run `ferflow evaluate` with {dataset} included")
    return Evaluation(metrics, tags)


def evaluation_from_run(run, dataset: str, model: str) -> Evaluation:
    """The evaluation logged into a training run (`eval_*` metrics, `eval.*` tags)."""
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("eval_")}
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("eval.")}
    if "eval_accuracy" not in metrics:
        raise FerflowError(
            f"no evaluation of {model} trained on {dataset}: no evaluation files under evaluate.out_dir and no "
            f"eval_accuracy in MLflow run {run.info.run_id}; run `ferflow evaluate --dataset {dataset} --model {model}`"
        )
    tags.setdefault("eval.datasets", dataset)
    return Evaluation(metrics, tags)


def versions(client: "MlflowClient", name: str) -> list["ModelVersion"]:
    """Every version of registered model `name`, ascending; [] when there is no such model."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if service.not_found(exc):
            return []
        raise
    found, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda v: int(v.version))


def aliases(client: "MlflowClient", name: str) -> dict[str, str]:
    """alias -> version number, as text (MLflow gives ints in some entities, strings in others)."""
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def version_ref(name: str, version, held: dict[str, str]) -> str:
    """`models:/<name>/<version>` and the aliases it holds (`held`: alias -> version)."""
    names = sorted(a for a, v in held.items() if v == str(version))
    return " ".join([f"models:/{name}/{version}", *(f"@{a}" for a in names)])


def registry_results(params: Params) -> "pd.DataFrame":
    """The long results table of `ferflow.evaluation.report.collect_results`, built from
    the registry: per registered model (one per dataset) and zoo model, the champion if it
    is that zoo model, else its newest version; `source` names it (`version_ref`)."""
    import pandas as pd

    from ferflow.evaluation.report import COLUMNS

    client = service.connect(params)
    rows, baselines = [], {}
    with service.mlflow_errors("reading the registry"):
        for dataset in params.data.datasets:
            name = params.registry.name_for(dataset)
            found = versions(client, name)
            if not found:
                continue
            held = aliases(client, name)
            champion = held.get(CHAMPION)
            chosen: dict[str, ModelVersion] = {}
            for version in found:  # ascending: the newest wins unless the champion holds the model
                model = version.tags.get("model.name")
                if model and not (model in chosen and str(chosen[model].version) == champion):
                    chosen[model] = version
            for model, version in sorted(chosen.items()):
                train_dataset = version.tags.get("dataset.name", dataset)
                source = version_ref(name, version.version, held)
                for eval_ds, m in sorted(per_dataset(version.tags, eval_datasets(version.tags)).items()):
                    rows.append({"stage": layout.FINE_TUNED, "model": model, "train_dataset": train_dataset,
                                 "eval_dataset": eval_ds, "accuracy": m["accuracy"],
                                 "macro_f1": m.get("macro_f1", math.nan),
                                 "balanced_accuracy": m.get("balanced_accuracy", math.nan), "n": int(m.get("n", 0)),
                                 "source": source})
                    if "baseline_accuracy" in m:  # the starting point recorded with this version
                        baselines[(model, eval_ds)] = {
                            "stage": layout.ZERO_SHOT, "model": model, "train_dataset": layout.NO_TRAIN_DATASET,
                            "eval_dataset": eval_ds,
                            "accuracy": m["baseline_accuracy"], "macro_f1": m.get("baseline_macro_f1", math.nan),
                            "balanced_accuracy": math.nan, "n": int(m.get("n", 0)), "source": source}
    rows.extend(baselines[k] for k in sorted(baselines))
    return pd.DataFrame(rows, columns=COLUMNS)
