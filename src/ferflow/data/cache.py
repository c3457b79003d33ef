"""The uint8 image cache: one memory-mapped (N, S, S, 3) array per dataset, size and split.

Training reads these arrays directly, so no JPEG is decoded after `prepare`. NHWC uint8
keeps the files 4x smaller than float and makes a channels_last tensor for free.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ferflow.errors import FerflowError


def split_paths(dataset_dir: Path, size: int, split: str) -> tuple[Path, Path]:
    base = Path(dataset_dir) / "cache" / str(size)
    return base / f"{split}.npy", base / f"{split}.labels.npy"


class SplitWriter:
    """Appends resized images into a preallocated .npy; trims to the rows kept on close."""

    def __init__(self, dataset_dir: Path, size: int, split: str, capacity: int):
        self.images_path, self.labels_path = split_paths(dataset_dir, size, split)
        self.images_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.images_path.with_suffix(".partial.npy")
        self._shape = (size, size, 3)
        self._array = np.lib.format.open_memmap(
            self._tmp, mode="w+", dtype=np.uint8, shape=(max(capacity, 1), *self._shape)
        )
        self.count = 0

    def append(self, image: np.ndarray) -> None:
        self._array[self.count] = image
        self.count += 1

    def close(self, labels: np.ndarray) -> None:
        if len(labels) != self.count:
            raise ValueError(f"{len(labels)} labels for {self.count} images")
        array = self._array
        array.flush()
        if self.count == len(array):
            del self._array, array
            os.replace(self._tmp, self.images_path)
        else:  # some images were quarantined: copy the kept rows into an exact-size file
            final = np.lib.format.open_memmap(
                self.images_path, mode="w+", dtype=np.uint8, shape=(self.count, *self._shape)
            )
            final[:] = array[: self.count]
            final.flush()
            del final, self._array, array
            self._tmp.unlink()
        np.save(self.labels_path, labels.astype(np.int64))


class CachedSplit:
    """Read side: memory-mapped images + labels of one split at one size."""

    def __init__(self, dataset_dir: Path, split: str, size: int):
        self.images_path, self.labels_path = split_paths(dataset_dir, size, split)
        if not self.images_path.is_file() or not self.labels_path.is_file():
            raise FerflowError(
                f"{self.images_path}: no image cache for split {split!r} at size {size}; "
                f"run `ferflow prepare` with {size} in prepare.image_sizes"
            )
        self.split = split
        self.size = size
        self.labels = np.load(self.labels_path)
        self._images: np.ndarray | None = None
        if len(self.labels) != len(self.images):
            raise FerflowError(f"{self.images_path}: {len(self.images)} images but {len(self.labels)} labels")

    @property
    def images(self) -> np.ndarray:
        # Opened lazily so that pickling to DataLoader workers ships a path, not the data.
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        return self._images

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None
        return state
