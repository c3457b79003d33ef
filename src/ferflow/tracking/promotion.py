"""The promotion policy: which registered version should serve, decided from the versions'
tags alone. Pure: no MLflow calls (`aliases` reads the registry and moves the aliases).

Aliases only (stages are deprecated since MLflow 2.9):

    challenger          the newest registered version, waiting for `promote`
    champion            the version to serve: `models:/<name>@champion`
    previous-champion   the champion before the last promotion (what `rollback` restores)

A candidate is compared with the champion on the same evaluation data only (the
`eval.manifest_sha256` and `eval.split` tags), must beat it strictly, by at least
`min_delta`, and must not score below the zero-shot accuracy of its own base checkpoint.
With no champion yet, the first must beat that zero-shot start on the gate metric where
one was recorded, else reach a floor above chance (`registry.first_champion_min`).
Every decision, promoted or refused, becomes `promotion.*` tags (`PromotionDecision.tags`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Optional

from ferflow.tracking.payload import MAX_VERSION_TAG_VALUE

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"


@dataclass(frozen=True)
class PromotionDecision:
    """What `promote` or `rollback` decided, also written as `promotion.*` version tags."""

    name: str
    action: str  # "promoted" | "refused" | "rolled-back" | "skipped" (a DVC experiment trial)
    reason: str
    at: str  # ISO 8601, UTC
    metric: str
    min_delta: float
    candidate_version: Optional[str] = None
    candidate_value: Optional[float] = None
    champion_version: Optional[str] = None  # before the decision
    champion_value: Optional[float] = None
    manifest_sha256: Optional[str] = None

    @property
    def promoted(self) -> bool:
        return self.action in ("promoted", "rolled-back")

    @property
    def champion_after(self) -> Optional[str]:
        return self.candidate_version if self.promoted else self.champion_version

    def tags(self) -> dict[str, str]:
        values = {
            "promotion.decision": self.action, "promotion.reason": self.reason, "promotion.at": self.at,
            "promotion.metric": self.metric, "promotion.min_delta": repr(self.min_delta),
            "promotion.candidate_value": _opt(self.candidate_value),
            "promotion.champion_version": self.champion_version or "none",
            "promotion.champion_value": _opt(self.champion_value),
        }
        return {k: v[:MAX_VERSION_TAG_VALUE] for k, v in values.items()}

    def as_dict(self) -> dict:
        return {**asdict(self), "promoted": self.promoted, "champion_after": self.champion_after}


def now() -> str:
    """A decision's `at`: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def version_metric(version: "ModelVersion", metric: str) -> Optional[float]:
    """A version's `metric` tag as a number; None when missing, not a number, or NaN."""
    try:
        value = float(version.tags[metric])
    except (KeyError, ValueError):
        return None
    return None if math.isnan(value) else value


def data_key(version: "ModelVersion") -> tuple[str, str]:
    """What a version was evaluated on: (manifest digest, split)."""
    return version.tags.get("eval.manifest_sha256", "unknown"), version.tags.get("eval.split", "eval")


def contenders(versions: list, aliases: dict[str, str]) -> tuple:
    """(champion, challenger, candidates) of a registered model's `versions` and `aliases`
    (alias -> version number as text). Candidates: the challenger and every version newer
    than the champion (two registrations racing for `challenger` both count), except
    versions a rollback demoted."""
    # Versions are ints in some MLflow entities and strings in aliases: compare as text.
    by_number = {str(v.version): v for v in versions}
    champion = by_number.get(aliases.get(CHAMPION, ""))
    challenger = by_number.get(aliases.get(CHALLENGER, ""))
    if challenger is champion:
        challenger = None
    candidates = [v for v in versions if v is challenger or (
        v is not champion and "rollback.demoted_at" not in v.tags
        and (champion is None or int(v.version) > int(champion.version)))]
    return champion, challenger, candidates


def decide(name: str, champion, challenger, candidates: list, metric: str, min_delta: float, force: bool,
           at: Optional[str] = None, *, first_min: float = 0.0) -> PromotionDecision:
    """The decision on `candidates` (see `contenders`) against `champion` on `metric`.

    The best candidate must be strictly better than the champion, by at least `min_delta`,
    on the champion's evaluation data; a challenger evaluated on other data is refused as
    not comparable. Without a champion, the best candidate evaluated on the newest
    candidate's data that clears `first_bar` (its zero-shot start on `metric`, else
    `first_min`) wins. A version below its starting point (`below_starting_point`) is
    refused. `force` skips the gate (the challenger first); it is still recorded. `at`:
    the decision's time (default now).
    """
    base = dict(name=name, at=at or now(), metric=metric, min_delta=min_delta)
    champ_value = version_metric(champion, metric) if champion is not None else None
    if champion is not None:
        base.update(champion_version=str(champion.version), champion_value=champ_value)

    def verdict(action: str, version, value, reason: str) -> PromotionDecision:
        return PromotionDecision(action=action, candidate_version=str(version.version), candidate_value=value,
                                 manifest_sha256=data_key(version)[0], reason=reason, **base)

    scored = [(v, version_metric(v, metric)) for v in candidates]
    if challenger is not None and version_metric(challenger, metric) is None:
        return verdict("refused", challenger, None, f"challenger has no {metric!r} tag; was it evaluated?")
    scored = [(v, value) for v, value in scored if value is not None]
    if not force:
        # A fine-tuned model must beat the checkpoint it started from, whatever the champion is.
        if challenger is not None and (why := below_starting_point(challenger)):
            return verdict("refused", challenger, version_metric(challenger, metric),
                           why + "; promote with --force to override")
        below = [v for v, _ in scored if below_starting_point(v)]
        scored = [s for s in scored if s[0] not in below]
        if not scored and below:
            return verdict("refused", below[-1], version_metric(below[-1], metric),
                           below_starting_point(below[-1]) + "; promote with --force to override")
    if not scored:
        return PromotionDecision(action="refused", reason="no candidate: no challenger and no evaluated version "
                                 "newer than the champion", **base)
    if force:
        target = next((s for s in scored if s[0] is challenger), None) or _best_on_newest_data(scored)
        return verdict("promoted", target[0], target[1],
                       f"forced: gate skipped (champion {_vname(champion)} {metric} {_fmt(champ_value)})")
    if champion is None:
        pool = _newest_data(scored)
        cleared = [s for s in pool if first_bar(s[0], s[1], metric, first_min)[0]]
        if not cleared:  # report on the version asked about, else the best that fell short
            best, value = next((s for s in pool if s[0] is challenger), None) or _best(pool)
            return verdict("refused", best, value, f"no champion yet, and v{best.version} "
                           f"{first_bar(best, value, metric, first_min)[1]}; promote with --force to override")
        best, value = _best(cleared)
        return verdict("promoted", best, value, f"no champion: v{best.version} is the best of {len(pool)} "
                       f"candidate(s) evaluated on manifest {data_key(best)[0][:12]}, and its "
                       f"{first_bar(best, value, metric, first_min)[1]}")
    champ_key = data_key(champion)
    if challenger is not None and data_key(challenger) != champ_key:
        other = data_key(challenger)
        return verdict("refused", challenger, version_metric(challenger, metric), (
            f"not comparable: champion v{champion.version} was evaluated on manifest {champ_key[0][:12]} "
            f"({champ_key[1]} split), challenger v{challenger.version} on {other[0][:12]} ({other[1]} split); "
            "register the champion's weights evaluated on the new data, or promote with force"))
    comparable = [s for s in scored if data_key(s[0]) == champ_key]
    if not comparable:
        return PromotionDecision(action="refused", reason=(
            f"no candidate evaluated on the champion's data (manifest {champ_key[0][:12]}, {champ_key[1]} split)"),
            **base)
    best, value = _best(comparable)
    if champ_value is None:
        return verdict("promoted", best, value, f"champion v{champion.version} has no {metric!r} tag to defend")
    won = value - champ_value > 0 and value - champ_value >= min_delta
    if not won and challenger is not None:  # all lost: report on the version that was asked about
        best, value = challenger, version_metric(challenger, metric)
    delta = value - champ_value
    return verdict("promoted" if won else "refused", best, value, (
        f"{metric} {value:.6g} {'beats' if won else 'does not beat'} champion v{champion.version} "
        f"({champ_value:.6g}) on the same data: delta {delta:+.6g}, needed > 0 and >= min_delta {min_delta:g}"))


def passed_over(decision: PromotionDecision, challenger) -> PromotionDecision:
    """The refusal recorded on a challenger that lost to another candidate `decision` promoted
    (two registrations raced for the alias)."""
    return replace(decision, action="refused", candidate_version=str(challenger.version),
                   candidate_value=version_metric(challenger, decision.metric),
                   manifest_sha256=data_key(challenger)[0],
                   reason=f"v{decision.candidate_version} was promoted instead: {decision.reason}")


def skipped(name: str, experiment: str, metric: str, min_delta: float,
            champion_version: Optional[str]) -> PromotionDecision:
    """A DVC experiment trial is registered (tagged with its name) for comparison, never served."""
    return PromotionDecision(
        name=name, action="skipped", at=now(), metric=metric, min_delta=min_delta, champion_version=champion_version,
        reason=f"DVC experiment {experiment!r}: trials never move {CHAMPION} "
               "(set registry.promote_in_experiments: true, or pass --force)")


def rolled_back(name: str, restored, demoted, metric: str) -> PromotionDecision:
    """`restored` (the previous champion) serves again instead of `demoted`."""
    previous, current = str(restored.version), str(demoted.version)
    return PromotionDecision(
        name=name, action="rolled-back", at=now(), metric=metric, min_delta=0.0, candidate_version=previous,
        candidate_value=version_metric(restored, metric), champion_version=current,
        champion_value=version_metric(demoted, metric), manifest_sha256=restored.tags.get("eval.manifest_sha256"),
        reason=f"rollback: v{previous} restored as champion, v{current} becomes previous-champion",
    )


def below_starting_point(version) -> Optional[str]:
    """Why a version may not be promoted on its own merits: its in-domain eval accuracy is
    below the zero-shot accuracy of its base checkpoint on the same eval split; else None."""
    value, start = version_metric(version, "eval_accuracy"), version_metric(version, "eval_baseline_accuracy")
    if value is None or start is None or value >= start:
        return None
    return (f"v{version.version} eval accuracy {value:.4f} is below its starting point: the base checkpoint "
            f"{version.tags.get('model.name', '')} zero-shot scores {start:.4f} on the same eval split "
            f"({value - start:+.4f})")


def start_key(metric: str) -> str:
    """The tag of the zero-shot start beside a gate metric: eval_accuracy -> eval_baseline_accuracy."""
    return "eval_baseline_" + metric.removeprefix("eval_")


def first_bar(version, value: float, metric: str, first_min: float) -> tuple[bool, str]:
    """Whether a would-be first champion (no champion to beat yet) is good enough, and why.

    It must beat the zero-shot start of its base checkpoint on the same eval data
    (`eval_baseline_<x>` beside `eval_<x>`, recorded by evaluate) where there is one;
    else reach `first_min`, a floor above chance: a chance-level model must not serve."""
    start = version_metric(version, start_key(metric))
    if start is not None:
        relation = "beats" if value > start else "does not beat"
        return value > start, (f"{metric} {value:.4f} {relation} the zero-shot start of its base checkpoint "
                               f"{version.tags.get('model.name', '')} on the same eval data ({start:.4f})")
    relation = "reaches" if value >= first_min else "is below"
    return value >= first_min, (f"{metric} {value:.4f} {relation} registry.first_champion_min {first_min:g} "
                                "(no zero-shot start recorded to beat)")


def _newest_data(scored: list) -> list:
    """The candidates evaluated like the newest one: older data is stale."""
    newest = max(scored, key=lambda s: int(s[0].version))[0]
    return [s for s in scored if data_key(s[0]) == data_key(newest)]


def _best(scored: list) -> tuple:
    return max(scored, key=lambda s: (s[1], int(s[0].version)))


def _best_on_newest_data(scored: list) -> tuple:
    return _best(_newest_data(scored))


def _vname(version) -> str:
    return f"v{version.version}" if version is not None else "none"


def _fmt(value: Optional[float]) -> str:
    return "none" if value is None else f"{value:.6g}"


def _opt(value: Optional[float]) -> str:
    return "none" if value is None else repr(float(value))
