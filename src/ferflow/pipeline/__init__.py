"""Kubeflow Pipelines support: the glue between KFP artifacts and the stage paths (`glue`),
what a task publishes (`artifacts`), training on several GPUs (`distributed`: torchrun
on one machine; `trainjob`: a Kubeflow Trainer TrainJob across nodes), task sizing
(`sizing`), compiling the pipeline (`spec`), submitting runs (`submit`) and their CLI (`cli`).

The components themselves live in the repository's `components/`, one file each; inside
the image each calls its `ferflow.stages` function with the help of `glue`, `artifacts`
and `distributed` only, so there is one implementation of every stage. Nothing in this
package imports `components/` at module level.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

from ferflow import __version__

IMAGE_REPOSITORY = "ghcr.io/ferflow/ferflow"
# The versioned tag: what an image built outside a checkout (or a release) is called.
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}"
IMAGE_ENV = "FERFLOW_IMAGE"
# What the Dockerfile copies into the image (README.md only feeds package metadata).
IMAGE_INPUTS = ("Dockerfile", "requirements.lock", "pyproject.toml", "src")
_SKIPPED = ("__pycache__", ".egg-info", ".pyc")  # .dockerignore leaves them out too
CHECKOUT = Path(__file__).resolve().parents[3]  # src/ferflow/pipeline/ -> the repository

# Kubernetes Secret keys are the variable names. Only the tracking URI is required:
# username/password or a token depend on the server, and S3 credentials only on where data
# and artifacts live (an MLflow server with --serve-artifacts and public archive URIs need none).
MLFLOW_REQUIRED = ("MLFLOW_TRACKING_URI",)
MLFLOW_OPTIONAL = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")


def image_tag(repo: Path = CHECKOUT) -> Optional[str]:
    """`src-<12 hex>`: a digest of the files the image is built from, as the build context
    holds them (working tree, not a commit). `make image` tags the image with it and with
    the git commit; a compiled pipeline names it. Code, lock or Dockerfile changes give a
    new tag, docs and tests do not, and a pipeline compiled from a commit never has to name
    that commit. None outside a checkout (e.g. inside the image)."""
    repo = Path(repo)
    if not (repo / "Dockerfile").is_file() or not (repo / "src").is_dir():
        return None
    digest = hashlib.sha256()
    for name in IMAGE_INPUTS:
        path = repo / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            relative = file.relative_to(repo).as_posix()
            if any(part.endswith(_SKIPPED) for part in relative.split("/")):
                continue
            digest.update(relative.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return f"src-{digest.hexdigest()[:12]}"


def configured_image(repo: Path = CHECKOUT) -> str:
    """`FERFLOW_IMAGE` when set, else this checkout's image (`image_tag`), else the
    versioned tag."""
    tag = image_tag(repo)
    return os.environ.get(IMAGE_ENV, "").strip() or (f"{IMAGE_REPOSITORY}:{tag}" if tag else DEFAULT_IMAGE)


# What the components' `base_image` is at import; the pipeline's `image` parameter (default:
# the compile option) is what the tasks run.
IMAGE = configured_image()
