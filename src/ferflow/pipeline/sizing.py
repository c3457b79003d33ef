"""What each Kubeflow task reads and keeps on disk, estimated from params.

The KFP launcher copies every input artifact onto the pod before the code starts, so the
bytes a task reads are its input artifacts plus what it downloads itself. Tasks bring
their own data:

    fetch       downloads every archive once (cached: keyed on the archives' sha256)
    train       downloads only its dataset's archive(s), decodes them at its model's size
    evaluate    reads the fetched archives (every dataset's eval split) and the model
    zero-shot   reads the fetched archives
    register / promote / report   models, evaluations and small files

The same numbers size each task's work volume (its ephemeral storage) and feed
benchmarks/bench_pipeline.py, so the requests follow the data when archives change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from ferflow.config import Params

# LFW-FER: 165,369,418 bytes for 10,487 images; used when an archive declares no `images`.
JPEG_BYTES_PER_IMAGE = 15_800
WEIGHTS_BYTES = 40 * 2**20  # a B2 checkpoint is ~30 MB; a run dir keeps best + EMA copies
SMALL_BYTES = 2**20  # config, evaluation files, reports
GiB = 2**30


@dataclass(frozen=True)
class TaskBytes:
    """`reads`: bytes brought onto the pod; `disk`: the peak working set on its disk."""

    reads: int
    disk: int


def archive_images(params: Params, name: str) -> int:
    src = params.data.archives[name]
    if src.images is not None:
        return src.images
    return math.ceil((src.size or 0) / JPEG_BYTES_PER_IMAGE)


def archives_bytes(params: Params, names: Iterable[str]) -> int:
    return sum(params.data.archives[n].size or 0 for n in set(names))


def cache_bytes(params: Params, datasets: Iterable[str], size: int) -> int:
    """uint8 caches (N, size, size, 3) of these datasets at one size."""
    images = sum(archive_images(params, m) for d in datasets for m in params.data.members(d))
    return images * size * size * 3


def model_size(params: Params, model: str) -> int:
    from ferflow.models import zoo

    return zoo.input_size(model, params.require_train().input_size)


def task_bytes(params: Params, kind: str, dataset: str = "", model: str = "") -> TaskBytes:
    """Reads and disk of one task of the pipeline (`kind` is the component's name)."""
    data = params.data
    every = list(data.archives)
    if kind == "fetch":
        total = archives_bytes(params, every)
        return TaskBytes(total, 2 * total)  # a download is written beside its verified copy
    if kind == "train":
        own = archives_bytes(params, data.members(dataset))
        cache = cache_bytes(params, [dataset], model_size(params, model))
        return TaskBytes(own + WEIGHTS_BYTES, own + cache + 3 * WEIGHTS_BYTES)
    if kind in ("evaluate", "zero-shot"):
        from ferflow.evaluation.evaluate import eval_datasets_for

        raw = archives_bytes(params, every)
        cache = cache_bytes(params, eval_datasets_for(params, dataset if kind == "evaluate" else None),
                            model_size(params, model))
        return TaskBytes(raw + WEIGHTS_BYTES, raw + cache + 2 * WEIGHTS_BYTES)
    if kind == "register":
        return TaskBytes(WEIGHTS_BYTES + SMALL_BYTES, 3 * WEIGHTS_BYTES)
    if kind in ("promote", "report"):
        n = len(params.require_train().datasets) * len(params.require_train().models)
        return TaskBytes(n * SMALL_BYTES, n * SMALL_BYTES + GiB // 4)
    raise ValueError(f"unknown pipeline task {kind!r}")


def minimum_bytes(params: Params, kind: str, dataset: str = "", model: str = "") -> int:
    """The least a task could read: its images in the smallest form offered (the verified
    archives, or uint8 caches of just its datasets at its size), the model it evaluates or
    registers, and the small files it gathers (config, evaluations). Pretrained weights are
    left out: every design downloads them alike."""
    data, train = params.data, params.require_train()
    pairs, models = len(train.datasets) * len(train.models), len(train.models)
    if kind == "train":
        own = archives_bytes(params, data.members(dataset))
        return min(own, cache_bytes(params, [dataset], model_size(params, model))) + SMALL_BYTES
    if kind in ("evaluate", "zero-shot"):
        from ferflow.evaluation.evaluate import eval_datasets_for

        names = eval_datasets_for(params, dataset if kind == "evaluate" else None)
        raw = archives_bytes(params, [m for d in names for m in data.members(d)])
        images = min(raw, cache_bytes(params, names, model_size(params, model)))
        return images + SMALL_BYTES + (WEIGHTS_BYTES if kind == "evaluate" else 0)
    if kind == "register":
        return WEIGHTS_BYTES + 3 * SMALL_BYTES
    if kind == "promote":
        return (pairs + 1) * SMALL_BYTES
    if kind == "report":
        return (pairs + models + 1) * SMALL_BYTES
    if kind == "fetch":
        return archives_bytes(params, data.archives)
    raise ValueError(f"unknown pipeline task {kind!r}")


def disk_request(params: Params, kind: str) -> str:
    """The ephemeral-storage request of a kind of task: its largest instance over the run's
    (dataset, model) pairs, plus a quarter and 1 GiB for the image and logs, in whole GiB."""
    train = params.require_train()
    pairs = [(d, m) for d in train.datasets for m in train.models] or [("", "")]
    peak = max(task_bytes(params, kind, d, m).disk for d, m in pairs)
    return f"{math.ceil((peak * 1.25 + GiB) / GiB)}Gi"
