"""Where a model came from, as flat string tags: code (git), data (archive digest, manifest
digest, DVC lock), base weights, recipe, version and the orchestrator's run.

Every lookup degrades to "unknown" rather than failing: lineage describes a run, it never
decides whether one may happen.

KFP run id: `KFP_RUN_ID` when set (on a cluster, the pipeline maps the pod's
`pipeline/runid` label into it; the uncached register task also gets it as an input), else
`ARGO_WORKFLOW_NAME` (set by Argo-based executors), else "none". DVC trial: `DVC_EXP_NAME`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional


from ferflow import __version__, layout
from ferflow.config import Params
from ferflow.errors import FerflowError
from ferflow.redact import redact_uri

if TYPE_CHECKING:
    from mlflow.data.pandas_dataset import PandasDataset

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
DVC_LOCK = Path("dvc.lock")
KFP_RUN_ENV = ("KFP_RUN_ID", "ARGO_WORKFLOW_NAME")
# DVC names the experiment in the environment of the stages `dvc exp run` runs.
DVC_EXPERIMENT_ENV = "DVC_EXP_NAME"
EXPERIMENT_TAG = "dvc.experiment"  # on versions registered in a trial
# mlflow/utils/validation.py: MAX_DATASET_DIGEST_SIZE = 36 (a sha256 hex has 64).
MLFLOW_DIGEST_CHARS = 36


def _git(*args: str) -> Optional[str]:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not refresh (write) the index of the repo.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0"}
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, env=env, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_tags() -> dict[str, str]:
    """HEAD commit and whether tracked files differ from it (untracked files are ignored:
    data and outputs live untracked beside the code)."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        # Inside the container there is no .git: the image records the commit it was built from.
        baked = os.environ.get("FERFLOW_GIT_COMMIT", "").strip()
        return {"git.commit": baked or UNKNOWN, "git.dirty": "false" if baked else UNKNOWN}
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = UNKNOWN if status is None else str(bool(status)).lower()
    return {"git.commit": commit, "git.dirty": dirty}


def read_report(prepared_dir: Path, dataset: str) -> dict:
    path = layout.prepared_dir(prepared_dir, dataset) / layout.REPORT
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def dvc_lock_md5(dataset: str, lock_path: Path = DVC_LOCK) -> Optional[str]:
    """md5 of the `fetch@<dataset>` output in dvc.lock: the archive as DVC pinned it (None
    without a readable lock; lineage is recorded, never enforced, here)."""
    from ferflow.data.dvc_remote import read_pins

    try:
        pin = read_pins(Path(lock_path)).get(dataset)
    except FerflowError:
        return None
    return pin.md5 if pin else None


def kfp_run_id() -> str:
    for name in KFP_RUN_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return "none"


def dvc_experiment() -> str:
    """The name of the `dvc exp run` trial this process runs in; "" outside one."""
    return os.environ.get(DVC_EXPERIMENT_ENV, "").strip()


def _base_sha256(run_dir: Optional[Path]) -> Optional[str]:
    if run_dir is None:
        return None
    try:
        return layout.read_run_info(run_dir, required=()).get("weights_sha256")
    except FerflowError:  # lineage describes, never fails: the params' digest stands in
        return None


def lineage_tags(
    params: Params, dataset: str, model: str, run_dir: Optional[Path] = None, stage: str = "train"
) -> dict[str, str]:
    """Flat `str -> str` tags for a run or a model version; see the module docstring."""
    from ferflow.training.trainer import recipe_hash

    report = read_report(params.data.prepared_dir, dataset)
    tags = {
        **git_tags(),
        "dataset.name": dataset,
        "dataset.archive_sha256": params.data.content_sha256(dataset),
        "dataset.manifest_sha256": report.get("manifest_sha256") or UNKNOWN,
        "model.name": model,
        "model.base_checkpoint": redact_uri(params.weights_for(model).pretrained),
        "model.base_sha256": _base_sha256(run_dir) or params.weights_for(model).sha256 or "none",
        "ferflow.version": __version__,
        "ferflow.stage": stage,
        "kfp.run_id": kfp_run_id(),
    }
    md5 = dvc_lock_md5(dataset)
    if md5:
        tags["dataset.dvc_lock"] = md5
    try:
        tags["recipe.hash"] = recipe_hash(params, dataset, model)
    except FerflowError:  # params without a `train` section (e.g. zero-shot only)
        tags["recipe.hash"] = UNKNOWN
    return tags


def manifest_dataset(prepared_dir: Path, dataset: str, split: str) -> "PandasDataset":
    """The split's manifest rows as an `mlflow.data` dataset for `log_input(..., context=split)`.

    Name `<dataset>/<split>`: MLflow keeps one input per (name, digest) and run, so train
    and val of one manifest need distinct names. Digest: the manifest's sha256 (cut to the
    36 characters MLflow stores); source: the archive URI from the prepare report.
    """
    import pandas as pd
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.exceptions import MlflowException

    prepared = layout.prepared_dir(prepared_dir, dataset)
    report = read_report(prepared_dir, dataset)
    digest = report.get("manifest_sha256")
    if not digest or not (prepared / layout.MANIFEST).is_file():
        raise FerflowError(f"{prepared}: no prepared manifest/report; run `ferflow prepare --dataset {dataset}`")
    manifest = pd.read_parquet(prepared / layout.MANIFEST)
    rows = manifest[manifest["split"] == split].reset_index(drop=True)
    uri = redact_uri(str(report.get("archive", {}).get("uri") or prepared))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "source can be interpreted in multiple ways"
        try:
            source = resolve_dataset_source(uri)
        except MlflowException:  # gdrive:// and other schemes MLflow has no source type for
            source = resolve_dataset_source(str(prepared.resolve()))
        return from_pandas(
            rows, source=source, targets="label", name=f"{dataset}/{split}", digest=digest[:MLFLOW_DIGEST_CHARS]
        )
