"""Moving the aliases of a registered model by the promotion policy (`promotion.decide`):
`promote` (challenger or a newer version -> champion, the old champion -> previous-champion)
and `rollback` (champion <-> previous-champion). Every decision is written as `promotion.*`
tags on the version it concerns.
"""

from __future__ import annotations

import logging
from typing import Optional

import mlflow
from mlflow.exceptions import MlflowException

from ferflow.config import Params
from ferflow.errors import FerflowError
from ferflow.tracking import service
from ferflow.tracking.lineage import dvc_experiment
from ferflow.tracking.promotion import (
    CHAMPION,
    CHALLENGER,
    PREVIOUS,
    PromotionDecision,
    contenders,
    decide,
    passed_over,
    rolled_back,
    skipped,
)
from ferflow.tracking.queries import aliases, versions

log = logging.getLogger(__name__)


def promote(params: Params, name: str, metric: Optional[str] = None, min_delta: Optional[float] = None,
            *, force: bool = False) -> PromotionDecision:
    """Move `champion` to the best candidate if it beats the champion on `metric`.

    Candidates: the `challenger` version and every version newer than the champion (two
    registrations racing for the `challenger` alias both count), except versions a
    rollback demoted. They are compared with the champion only when evaluated on the
    same data (`eval.manifest_sha256` and `eval.split` tags); a challenger evaluated on
    other data is refused as not comparable. The best must be strictly better, by at
    least `min_delta`. Without a champion, the best candidate evaluated on the newest
    candidate's data is promoted. `force` skips the gate for the challenger (after a data
    change, say); it is still recorded. Metric and delta default to `registry.metric` /
    `registry.min_delta`. The decision is written as `promotion.*` tags on the candidate.
    """
    metric = metric or params.registry.metric
    min_delta = params.registry.min_delta if min_delta is None else float(min_delta)
    client = service.connect(params)
    experiment = dvc_experiment()
    if experiment and not params.registry.promote_in_experiments and not force:
        with service.mlflow_errors(f"promoting {name}"):
            current = aliases(client, name)
        return skipped(name, experiment, metric, min_delta, current.get(CHAMPION))
    with service.mlflow_errors(f"promoting {name}"):
        found = versions(client, name)
        if not found:
            raise FerflowError(f"no registered model {name!r} (or no versions) at {mlflow.get_registry_uri()}; "
                               "run `ferflow register` first")
        champion, challenger, candidates = contenders(found, aliases(client, name))
        decision = decide(name, champion, challenger, candidates, metric, min_delta, force)
        if decision.candidate_version is None:
            return decision  # nothing to tag
        if decision.promoted:
            if champion is not None:
                client.set_registered_model_alias(name, PREVIOUS, champion.version)
                client.set_model_version_tag(name, champion.version, "promotion.replaced_by", decision.candidate_version)
                client.set_model_version_tag(name, champion.version, "promotion.replaced_at", decision.at)
            client.set_registered_model_alias(name, CHAMPION, decision.candidate_version)
            if challenger is not None:
                client.delete_registered_model_alias(name, CHALLENGER)
                if str(challenger.version) != decision.candidate_version:
                    for key, value in passed_over(decision, challenger).tags().items():
                        client.set_model_version_tag(name, challenger.version, key, value)
        for key, value in decision.tags().items():
            client.set_model_version_tag(name, decision.candidate_version, key, value)
        log.info("%s: %s version %s: %s", name, decision.action, decision.candidate_version, decision.reason)
        return decision


def rollback(params: Params, name: str) -> PromotionDecision:
    """Swap `champion` and `previous-champion`; recorded as tags on both versions."""
    client = service.connect(params)
    with service.mlflow_errors(f"rolling back {name}"):
        try:
            current_aliases = aliases(client, name)
        except MlflowException as exc:
            if service.not_found(exc):
                raise FerflowError(f"no registered model {name!r} at {mlflow.get_registry_uri()}") from None
            raise
        current, previous = (current_aliases.get(a) for a in (CHAMPION, PREVIOUS))
        if current is None or previous is None:
            raise FerflowError(f"{name}: nothing to roll back to (champion: {current or 'none'}, "
                               f"previous-champion: {previous or 'none'})")
        restored, demoted = client.get_model_version(name, previous), client.get_model_version(name, current)
        decision = rolled_back(name, restored, demoted, params.registry.metric)
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_registered_model_alias(name, PREVIOUS, current)
        for key, value in decision.tags().items():
            client.set_model_version_tag(name, previous, key, value)
        client.set_model_version_tag(name, current, "rollback.demoted_at", decision.at)
        client.set_model_version_tag(name, current, "rollback.replaced_by", previous)
        log.info("%s: %s", name, decision.reason)
        return decision
