"""Kubeflow Pipelines support: the glue between KFP artifacts and the stage paths (`glue`),
compiling the pipeline (`spec`), submitting runs (`submit`) and their CLI (`cli`).

The components themselves live in the repository's `components/`, one file each; inside
the image they import only `glue` and `ferflow.stages`, so there is one implementation of
every stage. Nothing in this package imports `components/` at module level.
"""

from __future__ import annotations

import os

from ferflow import __version__

IMAGE_REPOSITORY = "ghcr.io/ferflow/ferflow"
# The tag the Dockerfile documents: the package version, so an image and the pipeline
# compiled from the same commit agree.
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}"
IMAGE_ENV = "FERFLOW_IMAGE"


def configured_image() -> str:
    """`FERFLOW_IMAGE` when set, else the versioned default tag."""
    return os.environ.get(IMAGE_ENV, "").strip() or DEFAULT_IMAGE


# What the components' `base_image` is at import; the pipeline's `image` parameter (default:
# the compile option) is what the tasks run.
IMAGE = configured_image()
