# The image every task of the ferflow Kubeflow pipeline runs in (and a GPU `ferflow` CLI).
#
#   docker build --build-arg FERFLOW_GIT_COMMIT=$(git rev-parse HEAD) -t ghcr.io/ferflow/ferflow:0.1.0 .
#
# Tag: ghcr.io/ferflow/ferflow:<version>, <version> being the package version of
# pyproject.toml (ferflow.__version__). `ferflow pipeline compile` uses that tag unless
# FERFLOW_IMAGE or --image names another; a run can also override it (`image` parameter).
#
# Base: the official PyTorch runtime image, pinned, for a CUDA build of torch/torchvision.
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/ferflow
COPY pyproject.toml requirements.lock README.md ./
COPY src ./src

# The same dependency set as CI, minus its torch stack: requirements.lock pins a CPU-machine
# torch with its CUDA wheels (torch, torchvision, triton, nvidia-*, cuda-*), which would
# replace the base image's build. The rest of the lock becomes pip *constraints* for the
# pyproject ranges, so every other package has the locked version; torch stays the base's
# (pyproject: torch>=2.4), and the build fails if pip swapped it anyway. kfp comes from the
# lock too: the components are compiled with install_kfp_package=False.
RUN grep -Ev '^(torch|torchvision|torchaudio|triton|nvidia-|cuda-)' requirements.lock > /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt . \
 && rm /tmp/constraints.txt \
 && python -c "import torch, torchvision, kfp, ferflow; assert torch.version.cuda, 'CUDA torch was replaced'"

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
