# The image every task of the ferflow Kubeflow pipeline runs in (and a GPU `ferflow` CLI).
#
#   make image      # = docker build --build-arg FERFLOW_GIT_COMMIT=<commit> \
#                   #     -t ghcr.io/ferflow/ferflow:src-<digest> -t ghcr.io/ferflow/ferflow:<commit> .
#
# Tags: the git commit (short), and `src-<digest>` of what this file copies in (Dockerfile,
# requirements.lock, pyproject.toml, src/; `ferflow pipeline image-tag` prints it), which is
# the image a pipeline compiled from the same checkout runs by default. FERFLOW_IMAGE or
# --image name another; a run can also override it (`image` parameter).
#
# Base: Debian's slim Python of the lock's version. CUDA comes with the lock's own torch:
# PyPI's torch 2.14.1 is a CUDA 13 build that carries its runtime as nvidia-* wheels (pinned in
# the lock), so the image runs the very torch/torchvision CI tests; the GPU driver comes from
# the node through the NVIDIA container runtime (CUDA 13 needs driver >= 580).
FROM python:3.11.7-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/ferflow

# Dependencies first, from the lock alone: this layer changes only when the lock does, so a
# code change rebuilds just the small layer below. nvidia-ml-py is in the lock for MLflow's
# GPU system metrics. The build fails on a CPU-only torch or a missing package.
COPY requirements.lock ./
RUN pip install --no-deps -r requirements.lock \
 && python -c "import torch, torchvision, timm, kfp, mlflow, pynvml; assert torch.version.cuda, 'torch is not a CUDA build'"

# The project itself, its dependencies untouched; pip check proves the lock satisfies
# pyproject's ranges.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps . \
 && pip check \
 && python -c "import ferflow.cli"

# Non-root at run time. HOME holds the pretrained-weights cache (FERFLOW_CACHE); KFP tasks
# write only their own temp folders and artifact paths.
RUN useradd --create-home --uid 1000 --shell /bin/bash ferflow
USER ferflow
WORKDIR /home/ferflow
ENV FERFLOW_CACHE=/home/ferflow/.cache/ferflow
# The image has no .git: MLflow lineage tags read the commit it was built from here.
ARG FERFLOW_GIT_COMMIT=""
ENV FERFLOW_GIT_COMMIT=${FERFLOW_GIT_COMMIT}

# KFP sets the container command for its components, which replaces this entry point.
ENTRYPOINT ["ferflow"]
CMD ["--help"]
