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


_NPY_HEADER_BYTES = 128  # fixed, so the row count can be rewritten in place


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A .npy v1.0 header for uint8 C-order data, space-padded to a fixed length."""
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"
    body_len = _NPY_HEADER_BYTES - 10
    body = text.ljust(body_len - 1).encode("latin1") + b"\n"
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + body


class SplitWriter:
    """Streams resized images into a .npy file; trims to the rows kept on close.

    Plain sequential writes: a memory-mapped output costs a page fault per 4 KiB, which
    dominated prepare's time on small VMs.
    """

    def __init__(self, dataset_dir: Path, size: int, split: str, capacity: int):
        self.images_path, self.labels_path = split_paths(dataset_dir, size, split)
        self.images_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.images_path.with_suffix(".partial.npy")
        self._shape = (size, size, 3)
        self._fh = open(self._tmp, "wb", buffering=1 << 22)
        self._header_len = self._write_header(max(capacity, 1))
        self.count = 0

    def _write_header(self, rows: int) -> int:
        self._fh.seek(0)
        self._fh.write(_npy_header((rows, *self._shape)))
        return self._fh.tell()

    def append(self, image: np.ndarray) -> None:
        if image.shape != self._shape or image.dtype != np.uint8:
            raise ValueError(f"expected a {self._shape} uint8 image, got {image.shape} {image.dtype}")
        self._fh.write(np.ascontiguousarray(image).data)
        self.count += 1

    def close(self, labels: np.ndarray) -> None:
        if len(labels) != self.count:
            raise ValueError(f"{len(labels)} labels for {self.count} images")
        # Fewer rows than planned (quarantined images): rewrite the shape in the fixed-size
        # header and cut the file after the last kept row.
        self._write_header(self.count)
        self._fh.truncate(self._header_len + self.count * int(np.prod(self._shape)))
        self._fh.close()
        os.replace(self._tmp, self.images_path)
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
