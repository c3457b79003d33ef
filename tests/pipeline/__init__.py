"""Tests of the Kubeflow pipeline: compile, kfp.local run, submit, parity with dvc.yaml,
DVC-pinned fetch, Dockerfile. The repository root goes on sys.path so that the tests can
import `components` and load `pipelines/ferflow_pipeline.py`, as the compile step does."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
