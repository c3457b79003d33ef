"""The task image (no Docker engine here, so the Dockerfile is checked as text): a pinned
CUDA PyTorch base, the package installed from pyproject.toml constrained by the lock minus
its CPU torch stack, a non-root user, `ferflow` as entry point, a lean build context, and
the tag the pipeline uses by default documented beside it."""

import re
import tomllib

import pytest

from ferflow import __version__
from ferflow.pipeline import DEFAULT_IMAGE, IMAGE, IMAGE_REPOSITORY

from . import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
INSTRUCTIONS = [line.strip() for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
                if line.strip() and not line.lstrip().startswith("#")]


def _all(keyword: str) -> list[str]:
    return [line[len(keyword):].strip() for line in INSTRUCTIONS if line.upper().startswith(keyword + " ")]


def test_base_is_a_pinned_cuda_pytorch_runtime():
    (base,) = _all("FROM")
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", base)
    assert match, base


def test_installs_the_project_with_the_lock_as_constraints_minus_torch():
    run = " ".join(_all("RUN"))
    assert any("pyproject.toml" in c and "requirements.lock" in c for c in _all("COPY"))
    assert "pip install -c /tmp/constraints.txt ." in run
    pattern = re.search(r"grep -Ev '([^']+)' requirements.lock", run).group(1)
    lock = (REPO / "requirements.lock").read_text().splitlines()
    kept = [line for line in lock if not re.search(pattern, line)]
    dropped = {line.split("==")[0] for line in lock if re.search(pattern, line)}
    assert {"torch", "torchvision", "triton"} <= dropped
    assert all(name.startswith(("torch", "triton", "nvidia-", "cuda-")) for name in dropped), dropped
    names = {line.split("==")[0].lower() for line in kept if "==" in line}
    assert {"kfp", "kfp-kubernetes", "mlflow", "timm", "dvc", "boto3"} <= names
    assert "torch.version.cuda" in run  # the build fails if pip replaced the CUDA torch


def test_runs_as_a_non_root_user_with_ferflow_as_entry_point():
    users = _all("USER")
    assert users and users[-1] not in ("root", "0")
    assert INSTRUCTIONS.index(f"USER {users[-1]}") > max(i for i, line in enumerate(INSTRUCTIONS)
                                                        if "pip install" in line)
    assert _all("ENTRYPOINT") == ['["ferflow"]']


def test_build_context_leaves_out_data_stores_and_credentials():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "data", "mlruns", "demo", ".git", ".dvc/cache", ".dvc/config.local"} <= ignored


def test_default_image_tag_is_the_documented_versioned_one():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert version == __version__
    assert DEFAULT_IMAGE == f"{IMAGE_REPOSITORY}:{version}"
    assert re.search(rf"docker build .*-t {re.escape(DEFAULT_IMAGE)} \.", DOCKERFILE)


@pytest.mark.parametrize("name", ["fetch", "prepare", "train", "evaluate", "register", "promote", "report"])
def test_components_default_to_the_image(name):
    """`base_image` of every component is the configured tag (FERFLOW_IMAGE or the default;
    the pipeline then sets its `image` parameter on each task, which test_compile checks)."""
    import importlib

    component = getattr(importlib.import_module(f"components.{name}"), name)
    assert component.component_spec.implementation.container.image == IMAGE
