"""What `ferflow registry` shows, read from the registry alone: per registered model (one per
dataset), every version with its aliases, gate metric and zero-shot start, the data it was
evaluated on, the checkpoint it was fine-tuned from and the run it came from, its latest
promotion decision, and the model's promotion log (`history`). Reads only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Iterable, Optional

import mlflow

from ferflow.config import Params
from ferflow.errors import FerflowError
from ferflow.redact import redact_uri
from ferflow.tracking import history, service
from ferflow.tracking.lineage import EXPERIMENT_TAG
from ferflow.tracking.promotion import CHAMPION, data_key, start_key, version_metric
from ferflow.tracking.queries import aliases, versions


@dataclass(frozen=True)
class VersionSummary:
    version: str
    aliases: list[str]
    metric_value: Optional[float]  # the gate metric (registry.metric)
    start_value: Optional[float]  # the zero-shot start of its base checkpoint on the same metric and data
    eval_manifest_sha256: str
    eval_split: str
    model: str  # the zoo name
    base_checkpoint: str
    base_sha256: str
    weights_sha256: str
    run_id: Optional[str]
    registered_at: str  # ISO 8601, UTC
    decision: Optional[str]  # its latest promotion.decision, None if never decided on
    reason: Optional[str]
    dvc_experiment: Optional[str]


@dataclass(frozen=True)
class ModelSummary:
    name: str
    dataset: str
    metric: str
    min_delta: float
    first_champion_min: float
    aliases: dict[str, str]  # alias -> version
    versions: list[VersionSummary]  # ascending
    history: list[dict]  # oldest first; the last `limit` when limited

    @property
    def champion(self) -> Optional[str]:
        return self.aliases.get(CHAMPION)

    def as_dict(self) -> dict:
        return {**asdict(self), "champion": self.champion}


def registry_overview(params: Params, datasets: Optional[Iterable[str]] = None,
                      limit: Optional[int] = None) -> list[ModelSummary]:
    """The registered models of `datasets` (default: every dataset in params that has one),
    with at most the last `limit` promotion decisions each (None: all). A dataset asked for
    by name that has no registered model is an error naming it."""
    asked = list(datasets or [])
    for dataset in asked:
        params.data.check_dataset(dataset)
    client = service.connect(params)
    found = []
    with service.mlflow_errors("reading the registry"):
        for dataset in asked or params.data.datasets:
            name = params.registry.name_for(dataset)
            listed = versions(client, name)
            if not listed:
                if asked:
                    raise FerflowError(f"no registered model {name!r} for dataset {dataset} at "
                                       f"{redact_uri(mlflow.get_registry_uri())}; run `ferflow register` first")
                continue
            held = aliases(client, name)
            log = history.read(client.get_registered_model(name).tags)
            found.append(ModelSummary(
                name=name, dataset=dataset, metric=params.registry.metric, min_delta=params.registry.min_delta,
                first_champion_min=params.registry.first_champion_min, aliases=held,
                versions=[_summary(v, held, params.registry.metric) for v in listed],
                history=log[-limit:] if limit else log))
    return found


def _summary(version, held: dict[str, str], metric: str) -> VersionSummary:
    tags = version.tags
    manifest, split = data_key(version)
    return VersionSummary(
        version=str(version.version), aliases=sorted(a for a, v in held.items() if v == str(version.version)),
        metric_value=version_metric(version, metric),
        start_value=version_metric(version, start_key(metric)),
        eval_manifest_sha256=manifest, eval_split=split, model=tags.get("model.name", ""),
        base_checkpoint=tags.get("model.base_checkpoint", "none"), base_sha256=tags.get("model.base_sha256", "none"),
        weights_sha256=tags.get("model.weights_sha256", ""), run_id=version.run_id or tags.get("source_run_id"),
        registered_at=datetime.fromtimestamp(version.creation_timestamp / 1000, timezone.utc).isoformat(
            timespec="seconds"),
        decision=tags.get("promotion.decision"), reason=tags.get("promotion.reason"),
        dvc_experiment=tags.get(EXPERIMENT_TAG))
