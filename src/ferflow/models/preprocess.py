"""Preprocessing, owned once: image -> the model's input.

Decode to RGB, crop (prepare.face_crop: none, a centre square or the detected face), resize
square to the input size with the recorded interpolation, normalise with the model's mean
and std. `ferflow prepare` runs the decode/crop/resize once into uint8 caches
(`decode_image`, bilinear); predict and the MLflow pyfunc run ferflow.data.prepare's
`decode_photo` per image with a model's Preprocess: the same function. A fine-tuned run records its `Preprocess` in run.json; a pretrained zoo
model's comes from its ZooEntry (input size, mean, std, interpolation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ferflow.errors import FerflowError

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# prepare writes its caches with this resize (ferflow.data.decode.decode_image).
CACHE_INTERPOLATION = "bilinear"


class Normalize:
    """uint8 [0, 255] -> float, (x - mean) / std, in one fused pass per batch."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 dtype: torch.dtype = torch.float32):
        std_t = torch.tensor(std, device=device, dtype=dtype)
        self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1)
        self.shift = (-torch.tensor(mean, device=device, dtype=dtype) / std_t).view(1, 3, 1, 1)
        self.dtype = dtype

    def __call__(self, images: Tensor) -> Tensor:
        return torch.addcmul(self.shift, images.to(self.dtype), self.scale)


@dataclass(frozen=True)
class Preprocess:
    """Image -> the model's input, as recorded with a model (run.json, ONNX metadata)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = CACHE_INTERPOLATION
    face_crop: str = "none"  # prepare.face_crop syntax
    face_margin: float = 1.3

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise FerflowError(f"interpolation {self.interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")

    @classmethod
    def for_entry(cls, entry, size: Optional[int] = None, face_crop: str = "none",
                  face_margin: float = 1.3) -> "Preprocess":
        """What a pretrained zoo model expects (its size unless `size`, its interpolation)."""
        return cls(int(size or entry.input_size), tuple(entry.mean), tuple(entry.std), entry.interpolation,
                   face_crop, face_margin)

    @classmethod
    def for_training(cls, entry, size: int, prepare) -> "Preprocess":
        """What a training on prepare's caches sees: the caches' resize and crop."""
        return cls(int(size), tuple(entry.mean), tuple(entry.std), CACHE_INTERPOLATION, prepare.face_crop,
                   prepare.face_margin)

    @classmethod
    def from_record(cls, record: Optional[dict], entry, size: int) -> "Preprocess":
        """A run.json `preprocess` record; runs from before it existed were trained on
        bilinear, uncropped caches at their input size."""
        if not record:
            return cls(int(size), tuple(entry.mean), tuple(entry.std), CACHE_INTERPOLATION)
        return cls(int(record["size"]), tuple(record["mean"]), tuple(record["std"]), record["interpolation"],
                   record.get("face_crop", "none"), float(record.get("face_margin", 1.3)))

    def as_record(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def normalizer(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Normalize:
        return Normalize(self.mean, self.std, device, dtype)
