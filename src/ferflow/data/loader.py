"""Batches of uint8 images + labels straight from the memory-mapped cache.

Each batch is gathered with one fancy-index read of the memory-mapped cache, so there is
no per-image Python work and no decode. Tensors come out NCHW in channels_last memory
(a free permute of NHWC); normalisation happens later, on the training device.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ferflow.data.cache import CachedSplit


def read_batch(split: CachedSplit, indices: np.ndarray, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch with a single fancy-index read; NCHW view in channels_last memory."""
    # Sorted reads are sequential on disk; order inside a batch does not matter.
    idx = np.sort(np.asarray(indices, dtype=np.int64))
    images = torch.from_numpy(np.ascontiguousarray(split.images[idx]))
    labels = torch.from_numpy(split.labels[idx])
    if pin_memory:
        images, labels = images.pin_memory(), labels.pin_memory()
    return images.permute(0, 3, 1, 2), labels


class EpochBatchSampler(Sampler[np.ndarray]):
    """Index batches; reshuffled per epoch from (seed, epoch) so runs and resumes repeat.

    With `num_replicas > 1` each rank takes a disjoint share: equal sizes (wrapping
    around) for training, exact shards (`pad=False`) for evaluation. With `weights`,
    indices are drawn with replacement in proportion to them (class-balanced sampling).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        num_replicas: int = 1,
        weights: np.ndarray | None = None,
        pad: bool = True,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.rank, self.num_replicas = drop_last, rank, num_replicas
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.pad = pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is not None:
            order = rng.choice(self.n, size=self.n, replace=True, p=self.weights)
        elif self.shuffle:
            order = rng.permutation(self.n)
        else:
            order = np.arange(self.n)
        if self.num_replicas > 1:
            if self.pad:
                per_rank = -(-self.n // self.num_replicas)
                order = np.resize(order, per_rank * self.num_replicas)  # pad by wrapping
            order = order[self.rank :: self.num_replicas]
        return order

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self._indices()
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            yield order[start : start + self.batch_size]

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class CacheLoader:
    """Iterates (uint8 NCHW channels_last, int64 labels) batches of one cached split.

    `workers` > 0 prefetches batches on threads, not processes: reading the cache is a
    memcpy that releases the GIL, and process workers would pay to ship every batch
    through shared memory, which measured 5-10x slower here (benchmarks/RESULTS.md).
    """

    def __init__(self, split: CachedSplit, sampler: EpochBatchSampler, workers: int = 0, pin_memory: bool = False):
        self.split, self.sampler, self.workers, self.pin_memory = split, sampler, workers, pin_memory
        self.prefetch = max(2, 2 * workers)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.workers == 0:
            for indices in self.sampler:
                yield read_batch(self.split, indices, self.pin_memory)
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="ferflow-loader") as pool:
            pending: deque = deque()
            for indices in self.sampler:
                pending.append(pool.submit(read_batch, self.split, indices, self.pin_memory))
                if len(pending) >= self.prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


def make_loader(
    dataset_dir: Path,
    split: str,
    size: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    num_replicas: int = 1,
) -> CacheLoader:
    """A loader over one cached split yielding (uint8 NCHW channels_last, int64 labels)."""
    cached = CachedSplit(Path(dataset_dir), split, size)
    sampler = EpochBatchSampler(len(cached), batch_size, shuffle, seed, drop_last, rank, num_replicas)
    return CacheLoader(cached, sampler, workers, pin_memory)
