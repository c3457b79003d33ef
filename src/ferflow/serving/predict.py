"""`ferflow predict`: 3-class expressions of image files, with the model's own preprocessing.

Each image goes through `decode_photo` (prepare's decode, crop and resize) and the
model's `Predictor`, the path evaluate and the MLflow pyfunc take, so a photo that is also in
a prepared eval split gets the probabilities evaluate wrote for it. Unreadable files are
reported and skipped, never fatal on their own.

Output rows: path, label, p_<class> (the model's class order), the crop box in the
original image's pixels (box_x0, box_y0, box_x1, box_y1) and `face`: how the box was chosen
(none = whole image, center, detected, fallback = no face found, centre box used).
"""

from __future__ import annotations

import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from ferflow import config
from ferflow.config import Params
from ferflow.data.decode import decode_photo
from ferflow.errors import ConfigError, FerflowError

# What PIL reads without plugins; a folder's other files are not images to predict on.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                              ".pbm", ".pnm"})
OUTPUT_FORMATS = (".csv", ".json")
BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")
_COLOURS = {"negative": (214, 39, 40), "neutral": (127, 127, 127), "positive": (44, 160, 44)}


@dataclass(frozen=True)
class Source:
    """An image file and its name relative to the folder it was found in (annotations)."""

    path: Path
    name: Path


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str
    probs: tuple[float, ...]
    box: tuple[int, int, int, int]
    face: str

    def row(self, classes: Sequence[str]) -> dict:
        return {"path": self.path, "label": self.label, **{f"p_{c}": p for c, p in zip(classes, self.probs)},
                **dict(zip(BOX_COLUMNS, self.box)), "face": self.face}


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class PredictResult:
    classes: list[str]
    face_crop: str
    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def columns(self) -> list[str]:
        return ["path", "label", *(f"p_{c}" for c in self.classes), *BOX_COLUMNS, "face"]

    def probabilities(self) -> np.ndarray:
        return np.array([p.probs for p in self.predictions], dtype=np.float64).reshape(-1, len(self.classes))


# ---------------------------------------------------------------------------- inputs


def find_images(paths: Iterable[Path]) -> list[Source]:
    """Files as given (whatever their extension: the user named them) and image files
    under folders, recursively; sorted by path, each once."""
    found: dict[Path, Source] = {}
    for given in paths:
        given = Path(given)
        if given.is_dir():
            for path in given.rglob("*"):
                if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                    found.setdefault(path.resolve(), Source(path, path.relative_to(given)))
        elif given.is_file():
            found.setdefault(given.resolve(), Source(given, Path(given.name)))
        else:
            raise ConfigError(f"{given}: no such file or directory")
    return sorted(found.values(), key=lambda s: str(s.path))


def output_format(out: Optional[Path]) -> str:
    """csv or json from --out's extension (CSV on stdout without --out)."""
    if out is None:
        return "csv"
    suffix = Path(out).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"--out {out}: expected a .csv or .json file name")
    return suffix[1:]


def check_face_crop(spec: str, option: str = "--face-crop") -> str:
    """prepare.face_crop syntax (config.check_face_crop), as an error naming the option."""
    try:
        return config.check_face_crop(spec)
    except ValueError as exc:
        raise ConfigError(f"{option} {spec.strip()!r}: {exc}") from None


def face_detector(face_crop: str, params: Params):
    """The MTCNN detector when `face_crop` detects faces (weights from prepare.detector,
    downloaded once into the ferflow cache), else None."""
    if not face_crop.startswith("detect"):
        return None
    from ferflow.data.faces import FaceDetector, detector_weights, read_weights_container

    if params.prepare.detector is None:
        raise ConfigError(f"face crop {face_crop!r} needs a face detector: set prepare.detector (weights, sha256)")
    return FaceDetector(read_weights_container(detector_weights(params.prepare.detector, params.fetch)))


# ---------------------------------------------------------------------------- predicting


def decode_workers() -> int:
    """Threads for read + decode: PIL releases the GIL while it decodes and resizes."""
    from ferflow.cpus import available_cpus

    return max(1, min(4, available_cpus()))


def predict_images(predictor, sources: Sequence[Source], batch_size: int = 32, detector=None,
                   annotate_dir: Optional[Path] = None, workers: int = 1,
                   advance: Optional[Callable[[int], None]] = None) -> PredictResult:
    """Predict every source, `batch_size` images per forward pass, decoding with `workers`
    threads; annotated copies go under `annotate_dir` by their relative names."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    preprocess, size = predictor.preprocess, predictor.preprocess.size
    result = PredictResult(list(predictor.classes), preprocess.face_crop)

    def decode(source: Source):
        try:
            data = source.path.read_bytes()
        except OSError as exc:
            return source, None, None, f"cannot read file: {exc.strerror or exc}"
        try:
            return source, data, decode_photo(data, preprocess, detector), None
        except Exception as exc:  # noqa: BLE001 - any decode failure is this file's problem, reported
            return source, None, None, str(exc) or type(exc).__name__

    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            decoded = list(pool.map(decode, chunk) if pool is not None else map(decode, chunk))
            good = [d for d in decoded if d[3] is None]
            result.skipped.extend(Skipped(str(s.path), why) for s, _, _, why in decoded if why is not None)
            if good:
                probs = predictor.probabilities_of_arrays([d[2].arrays[size] for d in good], batch_size)
                for (source, data, image, _), p in zip(good, probs):
                    pred = Prediction(str(source.path), result.classes[int(np.argmax(p))],
                                      tuple(float(v) for v in p), tuple(int(v) for v in image.box), image.face)
                    result.predictions.append(pred)
                    if annotate_dir is not None:
                        annotate(data, pred, result.classes, Path(annotate_dir) / source.name)
            if advance is not None:
                advance(len(chunk))
    finally:
        if pool is not None:
            pool.shutdown()
    return result


# ---------------------------------------------------------------------------- outputs


def write_result(result: PredictResult, out: Optional[Path], model_ref: str, model_info: dict) -> None:
    """CSV (predictions only) or JSON (predictions and the skipped files) to `out`, or CSV
    to stdout. Numbers at full precision: these are the model's probabilities, not a report."""
    import pandas as pd

    fmt = output_format(out)
    if fmt == "json":
        doc = {
            "model": model_ref, "model_name": model_info.get("model"), "classes": result.classes,
            "face_crop": result.face_crop, "predictions": [p.row(result.classes) for p in result.predictions],
            "skipped": [{"path": s.path, "reason": s.reason} for s in result.skipped],
        }
        _write_text(out, json.dumps(doc, indent=2) + "\n")
        return
    table = pd.DataFrame([p.row(result.classes) for p in result.predictions], columns=result.columns())
    text = table.to_csv(index=False, lineterminator="\n")
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        _write_text(out, text)


def _write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)  # a reader never sees half a file


def annotate(data: bytes, pred: Prediction, classes: Sequence[str], dest: Path) -> Path:
    """A copy of the image with the crop box and `label probability` drawn on it."""
    from PIL import Image, ImageDraw, ImageFont

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
    draw = ImageDraw.Draw(img)
    short = min(img.size)
    colour = _COLOURS.get(pred.label, (31, 119, 180))
    x0, y0, x1, y1 = pred.box
    draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=colour, width=max(1, round(short / 100)))
    text = f"{pred.label} {pred.probs[classes.index(pred.label)]:.2f}"
    font = ImageFont.load_default(size=max(9, short // 14))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top
    pad = max(1, th // 5)
    ty = y0 - th - 2 * pad if y0 - th - 2 * pad >= 0 else y0  # above the box when it fits
    tx = min(max(0, x0), max(0, img.width - tw - 2 * pad))
    draw.rectangle((tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad), fill=colour)
    draw.text((tx + pad - left, ty + pad - top), text, fill=(255, 255, 255), font=font)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        img.save(dest, quality=95) if dest.suffix.lower() in (".jpg", ".jpeg") else img.save(dest)
    except (KeyError, ValueError, OSError):  # an extension PIL cannot write: keep the name, add .png
        dest = dest.with_name(dest.name + ".png")
        img.save(dest)
    return dest


# ---------------------------------------------------------------------------- the command


def run(paths: Sequence[Path], model_ref: str, params: Params, out: Optional[Path] = None,
        annotate_dir: Optional[Path] = None, face_crop: Optional[str] = None, batch_size: int = 32,
        console=None) -> PredictResult:
    """`ferflow predict`: find, load, predict, write. Exit 1 (FerflowError) when not one
    image could be read; a bad --model is a ModelRefError (exit 2)."""
    from ferflow.serving.reference import load_reference
    from ferflow.training.runtime import select_device

    output_format(out)  # usage errors before any loading
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    override = check_face_crop(face_crop) if face_crop is not None else None
    sources = find_images(paths)
    if not sources:
        raise FerflowError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under "
                           f"{', '.join(str(p) for p in paths)}")
    device = select_device(params.train.device if params.train is not None else "auto")
    predictor = load_reference(model_ref, params, device)
    if override is not None:
        predictor.preprocess = replace(predictor.preprocess, face_crop=override)
    detector = face_detector(predictor.preprocess.face_crop, params)

    with _progress(console, len(sources)) as advance:
        result = predict_images(predictor, sources, batch_size, detector, annotate_dir, decode_workers(), advance)
    write_result(result, out, model_ref, predictor.info)
    if console is not None:
        from rich.markup import escape

        for s in result.skipped:
            console.print(f"[yellow]skipped[/] {escape(f'{s.path}: {s.reason}')}", highlight=False, soft_wrap=True)
    if not result.predictions:
        raise FerflowError(f"none of the {len(sources)} image file(s) could be read; see the skipped list above")
    return result


class _progress:
    """A rich progress bar on the (stderr) console, or nothing without one."""

    def __init__(self, console, total: int):
        self.console, self.total, self.bar = console, total, None

    def __enter__(self) -> Callable[[int], None]:
        if self.console is None:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            console=self.console, transient=True)
        self.bar.start()
        task = self.bar.add_task("predict", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
