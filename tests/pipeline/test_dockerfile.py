"""The task image (no Docker engine here, so the Dockerfile is checked as text): a pinned
slim Python base, the lock installed as it is (its CUDA torch included) in a layer before
the code, a non-root user, `ferflow` as entry point, a lean build context, and `make image`
tagging the commit and the digest the pipeline runs by default."""

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


def _lock() -> dict[str, str]:
    pins = [line.split("==") for line in (REPO / "requirements.lock").read_text().splitlines()
            if "==" in line and not line.startswith("#")]
    return {name.lower(): version for name, version in pins}


def test_base_is_a_pinned_slim_python_of_the_lock_s_version():
    (base,) = _all("FROM")
    match = re.fullmatch(r"python:(\d+\.\d+)\.\d+-slim-\w+", base)
    assert match, base
    header = (REPO / "requirements.lock").read_text().splitlines()[0]
    assert f"Python {match.group(1)}" in header  # the lock was resolved for this Python


def test_dependency_layer_comes_before_the_code():
    """A code change must not reinstall the dependency stack: the lock is copied and
    installed before `src` is copied."""
    copies = [i for i, line in enumerate(INSTRUCTIONS) if line.upper().startswith("COPY ")]
    lock_copy = next(i for i in copies if "requirements.lock" in INSTRUCTIONS[i])
    src_copy = next(i for i in copies if re.search(r"\bsrc\b", INSTRUCTIONS[i]))
    install_lock = next(i for i, line in enumerate(INSTRUCTIONS) if "pip install --no-deps -r requirements.lock" in line)
    assert lock_copy < install_lock < src_copy
    assert "src" not in INSTRUCTIONS[lock_copy] and "pyproject.toml" not in INSTRUCTIONS[lock_copy]
    install_project = next(i for i, line in enumerate(INSTRUCTIONS) if "pip install --no-deps ." in line)
    assert install_project > src_copy and "pip check" in INSTRUCTIONS[install_project]


def test_image_torch_is_the_lock_s_cuda_torch_with_gpu_metrics():
    """The image installs the lock as it is, torch stack included (PyPI's torch is a CUDA
    build whose runtime is the lock's nvidia-* wheels): what runs on the cluster is what CI
    tests. nvidia-ml-py is pinned for MLflow's GPU system metrics."""
    run = " ".join(_all("RUN"))
    assert "grep -Ev" not in run and "-c /tmp/constraints" not in run  # nothing filtered out
    lock = _lock()
    import torch
    import torchvision

    assert lock["torch"] == torch.__version__.split("+")[0] and lock["torchvision"] == torchvision.__version__.split("+")[0]
    assert any(name.startswith("nvidia-cuda-runtime") for name in lock)  # CUDA libraries of that build
    assert "nvidia-ml-py" in lock
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("nvidia-ml-py") for d in deps)
    assert "torch.version.cuda" in run and "pynvml" in run  # the build fails otherwise
    assert {"kfp", "kfp-kubernetes", "mlflow", "timm", "dvc", "boto3"} <= set(lock)


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


def test_make_image_tags_the_commit_and_the_pipeline_s_default(monkeypatch):
    """`make image` tags the git commit and the inputs digest, and the digest is what a
    compile of this checkout names (test_compile checks the committed YAML against it)."""
    from ferflow.pipeline import configured_image, image_tag

    makefile = (REPO / "Makefile").read_text()
    recipe = makefile[makefile.index("\nimage:"):]
    assert "docker build --build-arg FERFLOW_GIT_COMMIT=$$(git rev-parse HEAD)" in recipe
    assert "-t $$($(BIN)/ferflow pipeline image-tag)" in recipe and "$$(git rev-parse --short=12 HEAD)" in recipe
    monkeypatch.delenv("FERFLOW_IMAGE", raising=False)
    tag = image_tag(REPO)
    assert re.fullmatch(r"src-[0-9a-f]{12}", tag) and configured_image(REPO) == f"{IMAGE_REPOSITORY}:{tag}"
    assert "make image" in DOCKERFILE and "ferflow pipeline image-tag" in DOCKERFILE


def test_image_tag_follows_the_image_s_inputs_only(tmp_path):
    import shutil

    from ferflow.pipeline import image_tag

    for name in ("Dockerfile", "requirements.lock", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "a.py").write_text("x = 1\n")
    first = image_tag(tmp_path)
    (tmp_path / "README.md").write_text("docs")  # not an input
    (tmp_path / "src" / "pkg" / "__pycache__").mkdir()
    (tmp_path / "src" / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    assert image_tag(tmp_path) == first
    (tmp_path / "src" / "pkg" / "a.py").write_text("x = 2\n")
    assert image_tag(tmp_path) != first
    assert image_tag(tmp_path / "src") is None  # not a checkout


def test_versioned_tag_outside_a_checkout():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert version == __version__
    assert DEFAULT_IMAGE == f"{IMAGE_REPOSITORY}:{version}"


@pytest.mark.parametrize("name", ["fetch", "train", "evaluate", "zero_shot", "register", "promote", "report"])
def test_components_default_to_the_image(name):
    """`base_image` of every component is the configured tag (FERFLOW_IMAGE or the default;
    the pipeline then sets its `image` parameter on each task, which test_compile checks)."""
    import importlib

    component = getattr(importlib.import_module(f"components.{name}"), name)
    assert component.component_spec.implementation.container.image == IMAGE
