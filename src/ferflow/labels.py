"""The label contract: the three target classes, the splits a prepared dataset has, the
metric names every evaluation reports, and how a pretrained expression head's classes map
onto the classes. Defined once; data, models, training, evaluation and tracking import it."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ferflow.errors import FerflowError

CLASSES = ("negative", "neutral", "positive")  # label_id = index; never reorder
SPLITS = ("train", "val", "eval")  # a prepared dataset's splits, in this order
# What every evaluation reports per dataset (evaluation.metrics writes, tracking logs them).
METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "n")

# HSEmotion heads (FACTS.md): 8 classes Anger, Contempt, Disgust, Fear, Happiness, Neutral,
# Sadness, Surprise; 7 classes the same without Contempt. Surprise is ambiguous in valence.
_SOURCE_TARGET = {
    "anger": "negative",
    "contempt": "negative",
    "disgust": "negative",
    "fear": "negative",
    "sadness": "negative",
    "happiness": "positive",
    "neutral": "neutral",
    "surprise": None,  # decided by the `surprise` option
}
# AffectNet / RAF-DB spellings other FER models use for the same classes.
_ALIASES = {
    "angry": "anger",
    "disgusted": "disgust",
    "fearful": "fear",
    "happy": "happiness",
    "sad": "sadness",
    "surprised": "surprise",
}
SURPRISE_OPTIONS = ("ignore", "negative", "neutral", "positive")


def source_mapping(source_classes: Sequence[str], surprise: str = "ignore") -> dict[int, int | None]:
    """Source head index -> index in CLASSES, or None for a class whose logit is dropped.

    Zero-shot evaluation collapses probabilities with it, and the fine-tuning head is
    initialised from it (`train.head_init: mapped`), so both mean the same thing."""
    if surprise not in SURPRISE_OPTIONS:
        raise FerflowError(f"zero-shot surprise mapping {surprise!r} is not one of {', '.join(SURPRISE_OPTIONS)}")
    mapping: dict[int, int | None] = {}
    seen: dict[str, str] = {}
    for i, raw in enumerate(source_classes):
        name = _ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if name not in _SOURCE_TARGET:
            known = ", ".join(s.capitalize() for s in _SOURCE_TARGET)
            raise FerflowError(f"cannot map class {raw!r} of the source head to {'/'.join(CLASSES)}; known: {known}")
        if name in seen:
            raise FerflowError(f"source head lists {seen[name]!r} and {raw!r}: the same class twice")
        seen[name] = raw
        target = _SOURCE_TARGET[name] if name != "surprise" else (None if surprise == "ignore" else surprise)
        mapping[i] = None if target is None else CLASSES.index(target)
    missing = [c for j, c in enumerate(CLASSES) if j not in mapping.values()]
    if missing:
        raise FerflowError(
            f"source head {list(source_classes)} has no class for {', '.join(missing)}: no zero-shot mapping"
        )
    return mapping


def collapse_probs(probs: np.ndarray, mapping: dict[int, int | None], n_out: int = 3) -> np.ndarray:
    """Sum source probabilities per target, without dropped classes, and renormalise rows.

    Equals a softmax over the kept logits only, so dropping Surprise means "pick among the
    rest". A row with no mass left (all on dropped classes) becomes uniform.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or set(mapping) != set(range(p.shape[1])):
        raise ValueError(
            f"probs of shape {p.shape} do not match a {len(mapping)}-class mapping "
            "(slice heads with extra outputs, e.g. va_mtl's valence/arousal, to the emotion logits first)"
        )
    if np.any(p < 0):
        raise ValueError("collapse_probs takes probabilities (after softmax), not logits")
    out = np.zeros((p.shape[0], n_out))
    for src, dst in mapping.items():
        if dst is None:
            continue
        if not 0 <= dst < n_out:
            raise ValueError(f"mapping sends source class {src} to {dst}, outside 0..{n_out - 1}")
        out[:, dst] += p[:, src]
    total = out.sum(axis=1, keepdims=True)
    return np.divide(out, total, out=np.full_like(out, 1.0 / n_out), where=total > 0)
