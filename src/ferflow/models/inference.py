"""The one inference path: how every consumer turns images into 3-class probabilities.

Images arrive as uint8 NCHW batches at the input size (prepare's caches, or
ferflow.data.decode.decode_photo for photos). Everything after that
(normalise, channels_last, forward with DAN's tuple unwrapped, softmax, the zero-shot class
mapping) is `Predictor`, used by training validation, evaluate, zero-shot, the pyfunc,
predict and the ONNX export's parity check.

A fine-tuned run records the preprocessing it was trained with in run.json (`preprocess`):
serving follows the record, not the zoo, so a served model sees what training saw. The
zoo's own values are what a pretrained checkpoint expects (zero-shot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ferflow import layout
from ferflow.errors import FerflowError
from ferflow.labels import CLASSES
from ferflow.models.preprocess import Preprocess



def forward(model: nn.Module, images: Tensor) -> tuple[Tensor, Any]:
    """(logits, raw output): DAN returns (logits, features, heads), timm models logits."""
    out = model(images)
    return (out[0] if isinstance(out, tuple) else out), out


class Predictor:
    """A model in eval mode with its preprocessing: uint8 NCHW batches -> probabilities over
    `classes`. `head` replaces the forward (zero-shot: the pretrained head's logits) and
    `collapse` maps its probabilities onto the 3 classes."""

    def __init__(self, model: nn.Module, entry, preprocess: Preprocess, device: torch.device,
                 info: Optional[dict] = None, head: Optional[Callable[[nn.Module, Tensor], Tensor]] = None,
                 collapse: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                 classes: Sequence[str] = CLASSES):
        self.model, self.entry, self.preprocess, self.device = model.to(device).eval(), entry, preprocess, device
        self.info, self.head, self.collapse, self.classes = dict(info or {}), head, collapse, list(classes)
        self.normalize = preprocess.normalizer(device)

    def inputs(self, batch: Tensor) -> Tensor:
        """uint8 (N, 3, S, S) -> the normalised channels_last float batch the model takes."""
        return self.normalize(batch.to(self.device)).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def probabilities(self, batch: Tensor) -> np.ndarray:
        """uint8 (N, 3, S, S) -> (N, len(classes)) float64 probabilities."""
        x = self.inputs(batch)
        logits = self.head(self.model, x) if self.head is not None else forward(self.model, x)[0]
        probs = torch.softmax(logits.float(), dim=1).cpu().double().numpy()
        return self.collapse(probs) if self.collapse is not None else probs

    def probabilities_of(self, batches: Iterable[Tensor]) -> np.ndarray:
        out = [self.probabilities(b) for b in batches]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    def probabilities_of_arrays(self, arrays: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """uint8 HWC images at the input size (what ferflow.data.decode.decode_photo gives)."""
        return self.probabilities_of(
            torch.from_numpy(np.stack(arrays[i:i + batch_size])).permute(0, 3, 1, 2)
            for i in range(0, len(arrays), batch_size)
        )

    def probabilities_of_split(self, split, batch_size: int) -> np.ndarray:
        """Every image of a prepared split (ferflow.data.cache.CachedSplit), in cache order."""
        from ferflow.data.loader import CacheLoader, EpochBatchSampler

        loader = CacheLoader(split, EpochBatchSampler(len(split), batch_size, shuffle=False), workers=1)
        return self.probabilities_of(images for images, _labels in loader)


def load_run(run_dir: Path, device: torch.device) -> Predictor:
    """The fine-tuned model of a run directory (best.safetensors and run.json)."""
    info_path, weights = layout.trained_files(run_dir)
    return load_files(weights, info_path, device)


def load_files(weights: Path, run_json: Path, device: torch.device) -> Predictor:
    """A fine-tuned model from its weights and run.json (wherever they sit: a run directory,
    a registered version's artifacts)."""
    from ferflow.models import zoo

    info = layout.read_run_json(run_json)  # FerflowError naming the file, not a KeyError later
    entry = zoo.resolve(info["model"])
    classes = list(info.get("classes") or CLASSES)
    model = zoo.build_finetuned(entry, load_file(str(weights)), len(classes))
    preprocess = Preprocess.from_record(info.get("preprocess"), entry, int(info["input_size"]))
    return Predictor(model, entry, preprocess, device, info=info, classes=classes)


def load_zero_shot(params, model_name: str, device: torch.device, expected_sha256: Optional[str] = None,
                   size: Optional[int] = None) -> Optional[Predictor]:
    """The pretrained head of a zoo model mapped onto the 3 classes (evaluate.surprise), or
    None when it has no expression head or no weights."""
    from ferflow.labels import collapse_probs, source_mapping
    from ferflow.models import zoo
    from ferflow.models.weights import pretrained_for

    entry = zoo.resolve(model_name)
    weights_cfg = params.weights_for(model_name)
    if zero_shot_skip_reason(entry, weights_cfg.pretrained):
        return None
    try:
        pretrained = pretrained_for(entry, weights_cfg.pretrained, expected_sha256 or weights_cfg.sha256, params.fetch)
    except FerflowError as exc:
        if expected_sha256 is None:
            raise
        raise FerflowError(f"cannot evaluate the starting point of {model_name}: models.{model_name}.pretrained is "
                           f"not the checkpoint the run started from (sha256 {expected_sha256[:16]}…): {exc}") from None
    model = zoo.build_model(entry, pretrained=pretrained)
    mapping = source_mapping(entry.classes, params.evaluate.surprise)
    preprocess = Preprocess.for_entry(entry, size or zoo.input_size(model_name, params.require_train().input_size),
                                      params.prepare.face_crop, params.prepare.face_margin)
    return Predictor(model, entry, preprocess, device, info={"model": model_name, "stage": layout.ZERO_SHOT},
                     head=lambda m, x: zoo.zero_shot_forward(m, entry, x),
                     collapse=lambda probs: collapse_probs(probs, mapping))


def zero_shot_skip_reason(entry, pretrained: str) -> Optional[str]:
    """Why a zoo model has no "before fine-tuning" row, or None."""
    if not entry.classes:
        return "the model has no pretrained facial-expression head"
    if pretrained.strip().lower() in ("", "none"):
        return f"models.{entry.name}.pretrained is none"
    return None
