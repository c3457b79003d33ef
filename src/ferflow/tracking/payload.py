"""What ferflow sends to MLflow, shaped to its limits: flattened params, run tags and metrics
(keys sanitised, text redacted and clipped), model version tag values, and the prepared
manifests as dataset inputs.

Formatting only: no client calls here, and mlflow entities are imported where they are built.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from ferflow.errors import FerflowError
from ferflow.redact import redact_text

log = logging.getLogger(__name__)

# mlflow/utils/validation.py limits (MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH, MAX_ENTITY_KEY_LENGTH).
MAX_PARAM_VALUE, MAX_RUN_TAG_VALUE, MAX_KEY = 6000, 8000, 250
MAX_VERSION_TAG_VALUE = 5000  # MLflow's limit for model version tag values
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def now_ms() -> int:
    return int(time.time() * 1000)


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def safe_key(name: str) -> str:
    """A param, tag or metric key MLflow accepts: odd characters become `_`, cut to MAX_KEY."""
    return clip(_BAD_KEY_CHARS.sub("_", name), MAX_KEY)


def number(value: Any) -> Optional[float]:
    """`value` as a metric value; None for anything but an int or float (bools included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def flatten_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """`{"train": {"lr": 1}}` -> `{"train.lr": "1"}`; lists stay whole, as JSON (the
    `--set key=value` form); strings redacted; keys/values cut to MLflow's limits."""
    out: dict[str, str] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, key + "."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[safe_key(key)] = clip(redact_text(text), MAX_PARAM_VALUE)
    return out


def run_tags(mapping: dict) -> list:
    """RunTags, values redacted and clipped to MAX_RUN_TAG_VALUE."""
    from mlflow.entities import RunTag

    return [RunTag(safe_key(str(k)), clip(redact_text(str(v)), MAX_RUN_TAG_VALUE)) for k, v in mapping.items()]


def run_metrics(mapping: dict, step: int) -> list:
    """Metrics at `step`, now; values that are not numbers are left out."""
    from mlflow.entities import Metric

    ts = now_ms()
    return [Metric(safe_key(k), v, ts, step) for k, v in ((k, number(v)) for k, v in mapping.items()) if v is not None]


def version_tag(value: Any) -> str:
    """A value as it is stored in a model version tag: redacted, cut to MAX_VERSION_TAG_VALUE."""
    return redact_text(str(value))[:MAX_VERSION_TAG_VALUE]


def number_text(value: Any) -> str:
    """A metric as version tag text: whole numbers (counts) without `.0`."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) >= 1 else repr(value)


def dataset_input(prepared_dir: Path, dataset: str, split: str):
    """A DatasetInput for one split's manifest, or None when that data is not prepared."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from ferflow.tracking.lineage import manifest_dataset, read_report

    try:
        ds = manifest_dataset(prepared_dir, dataset, split)
    except FerflowError as exc:
        log.debug("no dataset input for %s/%s: %s", dataset, split, exc)
        return None
    full = read_report(prepared_dir, dataset).get("manifest_sha256", "")
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, split), InputTag("ferflow.manifest_sha256", full)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schema inference hints about integer columns
        return DatasetInput(dataset=ds._to_mlflow_entity(), tags=tags)
