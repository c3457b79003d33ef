"""The promotion log: every decision `promote` and `rollback` made about a registered model,
append-only, as tags of the registered model itself, `promotion.log.<time>-<nonce>` -> the
decision as JSON (`PromotionDecision.as_dict`, plus the KFP run or DVC trial that made it).

Why in MLflow rather than a file beside `registry/promotions/<dataset>.json`: the registry is
what the decisions change, and it is shared. Promotes run from checkouts on several
machines and from KFP tasks whose workspace is thrown away; a file would hold only its
own machine's decisions (and DVC deletes stage outputs before a rerun). Each decision is a
new key, never a rewrite, so two promotes at once cannot lose each other's entry even on a
tracking server, where no file lock reaches; the key's zero-padded nanosecond time sorts
the log in order, the nonce keeps keys of one instant apart. The latest decision per
version stays in its `promotion.*` tags, the latest per dataset in the DVC out.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Optional

from ferflow.redact import redact_text
from ferflow.tracking.lineage import dvc_experiment, kfp_run_id
from ferflow.tracking.payload import MAX_VERSION_TAG_VALUE

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from ferflow.tracking.promotion import PromotionDecision

log = logging.getLogger(__name__)

LOG_PREFIX = "promotion.log."
MAX_REASON = 2000  # a log entry stays far below any store's tag limit, whatever the reason says


def entry_key(at_ns: Optional[int] = None) -> str:
    """`promotion.log.<20-digit ns since the epoch>-<8 hex>`: sorts in time order."""
    return f"{LOG_PREFIX}{time.time_ns() if at_ns is None else at_ns:020d}-{secrets.token_hex(4)}"


def entry(decision: "PromotionDecision") -> dict:
    """What the log records of a decision: the decision, and what ran it."""
    record = decision.as_dict()
    record["reason"] = record["reason"][:MAX_REASON]
    if kfp_run_id() != "none":
        record["kfp_run_id"] = kfp_run_id()
    if dvc_experiment():
        record["dvc_experiment"] = dvc_experiment()
    return record


def append(client: "MlflowClient", name: str, decision: "PromotionDecision") -> str:
    """Add `decision` to the log of registered model `name`; returns its key."""
    key = entry_key()
    text = redact_text(json.dumps(entry(decision), sort_keys=True))
    client.set_registered_model_tag(name, key, text[:MAX_VERSION_TAG_VALUE])
    return key


def read(tags: dict[str, str]) -> list[dict]:
    """The log in a registered model's `tags`, oldest first; an entry that is not a JSON
    object (edited by hand) is kept as {"unreadable": <text>} rather than hidden."""
    entries = []
    for key in sorted(k for k in tags if k.startswith(LOG_PREFIX)):
        try:
            value = json.loads(tags[key])
        except ValueError:
            value = None
        if not isinstance(value, dict):
            log.warning("registry tag %s is not a promotion decision; shown as unreadable", key)
            value = {"unreadable": tags[key]}
        entries.append({"key": key, **value})
    return entries
