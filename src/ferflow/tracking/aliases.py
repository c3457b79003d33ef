"""Moving the aliases of a registered model by the promotion policy (`promotion.decide`):
`promote` (challenger or a newer version -> champion, the old champion -> previous-champion)
and `rollback` (champion <-> previous-champion). Every decision is written as `promotion.*`
tags on the version it concerns and appended to the registered model's promotion log
(`history`).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import mlflow
from mlflow.exceptions import MlflowException

from ferflow.config import Params
from ferflow.errors import FerflowError
from ferflow.tracking import history, service
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

Recorder = Callable[[PromotionDecision], None]


# A second promote of the same model waits for the first to move the aliases and log.
PROMOTE_LOCK_TIMEOUT_S = 300.0


def promote(params: Params, name: str, metric: Optional[str] = None, min_delta: Optional[float] = None,
            *, force: bool = False, record: Optional[Recorder] = None) -> PromotionDecision:
    """Move `champion` to the best candidate if it beats the champion on `metric`.

    Candidates: the `challenger` version and every version newer than the champion (two
    registrations racing for the `challenger` alias both count), except versions a
    rollback demoted. They are compared with the champion only when evaluated on the
    same data (`eval.manifest_sha256` and `eval.split` tags); a challenger evaluated on
    other data is refused as not comparable. The best must be strictly better, by at
    least `min_delta`. Without a champion, the best candidate evaluated on the newest
    candidate's data is promoted if it beats its zero-shot start, else reaches
    `registry.first_champion_min`. `force` skips the gate for the challenger (after a data
    change, say); it is still recorded. Metric and delta default to `registry.metric` /
    `registry.min_delta`. The decision is written as `promotion.*` tags on the candidate
    and appended to the model's promotion log (`history`); `record` (a file writer, say)
    gets it before the promote lock is released, so records land in decision order.
    """
    metric = metric or params.registry.metric
    min_delta = params.registry.min_delta if min_delta is None else float(min_delta)
    client = service.connect(params)
    with _promoting(name):
        with service.mlflow_errors(f"promoting {name}"):
            decision = _promote(client, params, name, metric, min_delta, force)
            history.append(client, name, decision)
        if record is not None:  # outside mlflow_errors: a failed write is not MLflow's
            record(decision)
    log.info("%s: %s version %s: %s", name, decision.action, decision.candidate_version, decision.reason)
    return decision


def _promote(client, params: Params, name: str, metric: str, min_delta: float, force: bool) -> PromotionDecision:
    experiment = dvc_experiment()
    if experiment and not params.registry.promote_in_experiments and not force:
        return skipped(name, experiment, metric, min_delta, aliases(client, name).get(CHAMPION))
    found = versions(client, name)
    if not found:
        raise FerflowError(f"no registered model {name!r} (or no versions) at {mlflow.get_registry_uri()}; "
                           "run `ferflow register` first")
    champion, challenger, candidates = contenders(found, aliases(client, name))
    decision = decide(name, champion, challenger, candidates, metric, min_delta, force,
                      first_min=params.registry.first_champion_min)
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
    return decision


def rollback(params: Params, name: str, *, record: Optional[Recorder] = None) -> PromotionDecision:
    """Swap `champion` and `previous-champion`; recorded as tags on both versions, in the
    promotion log and by `record` (as for `promote`)."""
    client = service.connect(params)
    with _promoting(name):
        decision = _rollback(client, params, name)
        if record is not None:
            record(decision)
    log.info("%s: %s", name, decision.reason)
    return decision


def _rollback(client, params: Params, name: str) -> PromotionDecision:
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
        history.append(client, name, decision)
    return decision


def _promoting(name: str):
    """Promotes and rollbacks of `name` on one embedded sqlite store take turns, so neither
    decides on aliases the other is moving; on a server the log still keeps both."""
    from ferflow.locks import lock_name

    return service.store_lock("promote-" + lock_name(name), f"promoting {name}", PROMOTE_LOCK_TIMEOUT_S)
