"""Face detection (MTCNN) and the face-region crop of `prepare.face_crop`.

Why MTCNN (Zhang et al., IEEE SPL 2016): it finds faces from ~20 px up in a single image
pyramid, gives five landmarks (eyes, nose, mouth corners) that also place synthetic masks,
and keeps working when the lower face is covered, because its first two stages look at
whole-face windows and the eyes carry most of the evidence. Its three small networks
(~2 MB) run on the CPU in milliseconds per image inside prepare's decode workers.

The weights are the ones facenet-pytorch ships inside its wheel on PyPI (MIT licence;
plain state_dicts, read with `torch.load(weights_only=True)`). That package itself pins
torch < 2.3 and numpy < 2, so ferflow does not install it: the wheel is a pinned download
(sha256 in params.yaml, `prepare.detector`), unpacked once into the ferflow cache. The
networks and the cascade below are ferflow's own implementation of the paper's method.
"""

from __future__ import annotations

import io
import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from ferflow.config import FACE_CROP_SYNTAX, DetectorSettings, FetchSettings
from ferflow.data import sources
from ferflow.errors import FerflowError

log = logging.getLogger(__name__)

NETS = ("pnet", "rnet", "onet")


# ---------------------------------------------------------------------------- networks


class _Net(nn.Module):
    """The convolutional trunk the three nets share: conv<i> -> prelu<i> (the names of the
    facenet-pytorch state_dicts), then a ceil-mode max-pool where a layer has one."""

    # Per conv layer: (out channels, kernel, max-pool (kernel, stride) or None).
    LAYERS: tuple[tuple[int, int, Optional[tuple[int, int]]], ...] = ()

    def __init__(self):
        super().__init__()
        channels = 3
        for i, (out, kernel, _) in enumerate(self.LAYERS, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(channels, out, kernel))
            setattr(self, f"prelu{i}", nn.PReLU(out))
            channels = out

    def trunk(self, x: Tensor) -> Tensor:
        for i, (_, _, pool) in enumerate(self.LAYERS, start=1):
            x = getattr(self, f"prelu{i}")(getattr(self, f"conv{i}")(x))
            if pool is not None:
                x = F.max_pool2d(x, *pool, ceil_mode=True)
        return x


class _PNet(_Net):
    """Proposal net: fully convolutional, 12x12 windows at stride 2 over each pyramid level."""

    LAYERS = ((10, 3, (2, 2)), (16, 3, None), (32, 3, None))

    def __init__(self):
        super().__init__()
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.trunk(x)
        return torch.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class _RNet(_Net):
    """Refinement net on 24x24 crops of the proposals."""

    LAYERS = ((28, 3, (3, 2)), (48, 3, (3, 2)), (64, 2, None))

    def __init__(self):
        super().__init__()
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.prelu4(self.dense4(_flatten_transposed(self.trunk(x))))
        return torch.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class _ONet(_Net):
    """Output net on 48x48 crops: final score, box and five landmarks."""

    LAYERS = ((32, 3, (3, 2)), (64, 3, (3, 2)), (64, 3, (2, 2)), (128, 2, None))

    def __init__(self):
        super().__init__()
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.prelu5(self.dense5(_flatten_transposed(self.trunk(x))))
        return torch.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def _flatten_transposed(x: Tensor) -> Tensor:
    # The original Caffe models were trained on transposed images; the converted dense
    # layers therefore expect features flattened in (width, height, channel) order.
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float
    landmarks: tuple[tuple[float, float], ...]  # left eye, right eye, nose, mouth left, mouth right


class FaceDetector:
    """MTCNN cascade on one RGB image at a time (H, W, 3 uint8)."""

    # The paper's thresholds; masked faces often fail them at the refinement stage, so
    # `find_face` retries with looser ones (measured on framed stand-in faces: bare faces
    # found 82 % -> 97 %, masked 32 % -> 77 %, no face on pure noise either way).
    STRICT = (0.6, 0.7, 0.7)
    LENIENT = (0.4, 0.05, 0.2)

    def __init__(self, weights: dict[str, dict[str, Tensor]], min_face: int = 20, factor: float = 0.709):
        self.nets = {"pnet": _PNet(), "rnet": _RNet(), "onet": _ONet()}
        for name, net in self.nets.items():
            try:
                net.load_state_dict(weights[name], strict=True)
            except (KeyError, RuntimeError) as exc:
                raise FerflowError(f"face detector weights: {name} does not fit MTCNN ({exc})") from None
            net.eval()
        self.min_face, self.factor = min_face, factor

    def find_face(self, image: np.ndarray) -> Optional[Face]:
        """The main face of an image that should hold one: strict pass, then a looser one."""
        faces = self.detect(image) or self.detect(image, self.LENIENT)
        return faces[0] if faces else None

    @torch.inference_mode()
    def detect(self, image: np.ndarray, thresholds: Optional[tuple[float, float, float]] = None) -> list[Face]:
        """Faces, best first (score x area), in pixel coordinates of `image`."""
        t_p, t_r, t_o = thresholds or self.STRICT
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
        h, w = image.shape[:2]
        if min(h, w) < 12:
            return []
        x = (torch.tensor(image).permute(2, 0, 1)[None].float() - 127.5) * 0.0078125
        boxes = self._proposals(x, h, w, t_p)
        if len(boxes):
            boxes = self._refine(x, boxes, t_r)
        if not len(boxes):
            return []
        boxes, points = self._output(x, boxes, t_o)
        faces = [Face(tuple(float(v) for v in b[:4]), float(b[4]),
                      tuple((float(p[i]), float(p[i + 5])) for i in range(5))) for b, p in zip(boxes, points)]
        return sorted(faces, key=lambda f: f.score * (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), reverse=True)

    def _proposals(self, x: Tensor, h: int, w: int, threshold: float) -> Tensor:
        scale = 12.0 / self.min_face
        side = min(h, w) * scale
        found = []
        level = 0
        while side >= 12:
            sh, sw = int(math.ceil(h * scale)), int(math.ceil(w * scale))
            prob, reg = self.nets["pnet"](F.interpolate(x, size=(sh, sw), mode="area"))
            ys, xs = torch.nonzero(prob[0] >= threshold, as_tuple=True)
            if len(ys):
                # Each output cell is a 12x12 window at stride 2 of this pyramid level.
                x0 = torch.floor((2 * xs + 1) / scale)
                y0 = torch.floor((2 * ys + 1) / scale)
                x1 = torch.floor((2 * xs + 12) / scale)
                y1 = torch.floor((2 * ys + 12) / scale)
                b = torch.stack([x0, y0, x1, y1, prob[0, ys, xs], *reg[0, :, ys, xs]], 1)
                b = b[nms(b[:, :4], b[:, 4], 0.5)]
                found.append(torch.cat([b, torch.full((len(b), 1), float(level))], 1))
            scale *= self.factor
            side *= self.factor
            level += 1
        if not found:
            return torch.zeros(0, 9)
        boxes = torch.cat(found)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        return _square(_regress(boxes[:, :5], boxes[:, 5:9]))

    def _refine(self, x: Tensor, boxes: Tensor, threshold: float) -> Tensor:
        prob, reg = self.nets["rnet"](_crops(x, boxes, 24))
        keep = prob > threshold
        boxes = torch.cat([boxes[keep, :4], prob[keep, None]], 1)
        reg = reg[keep]
        order = nms(boxes[:, :4], boxes[:, 4], 0.7)
        return _square(_regress(boxes[order], reg[order]))

    def _output(self, x: Tensor, boxes: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
        prob, reg, points = self.nets["onet"](_crops(x, boxes, 48))
        keep = prob > threshold
        boxes, reg, points = boxes[keep, :4], reg[keep], points[keep]
        bw, bh = (boxes[:, 2] - boxes[:, 0] + 1)[:, None], (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        points = torch.cat([boxes[:, :1] + bw * points[:, :5] - 1, boxes[:, 1:2] + bh * points[:, 5:] - 1], 1)
        boxes = _regress(torch.cat([boxes, prob[keep, None]], 1), reg)
        order = _nms_min(boxes[:, :4], boxes[:, 4], 0.7)
        return boxes[order], points[order]


def _regress(boxes: Tensor, reg: Tensor) -> Tensor:
    """Apply the nets' box offsets (fractions of the box size) to (x0, y0, x1, y1, score) rows."""
    w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
    h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
    shifted = boxes[:, :4] + reg * torch.cat([w, h, w, h], 1)
    return torch.cat([shifted, boxes[:, 4:5]], 1)


def _square(boxes: Tensor) -> Tensor:
    """Grow each box to a square around its centre (the next net sees square crops)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x0 = boxes[:, 0] + w * 0.5 - side * 0.5
    y0 = boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.stack([x0, y0, x0 + side, y0 + side, boxes[:, 4]], 1)


def _crops(x: Tensor, boxes: Tensor, size: int) -> Tensor:
    """size x size crops of x at integer boxes; outside the image is zero (mid-grey)."""
    _, _, h, w = x.shape
    out = torch.zeros(len(boxes), 3, size, size)
    for i, (x0, y0, x1, y1) in enumerate(boxes[:, :4].round().int().tolist()):
        x1, y1 = max(x1, x0), max(y1, y0)
        patch = torch.zeros(1, 3, y1 - y0 + 1, x1 - x0 + 1)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)
        if sx1 >= sx0 and sy1 >= sy0:
            patch[..., sy0 - y0: sy1 - y0 + 1, sx0 - x0: sx1 - x0 + 1] = x[..., sy0: sy1 + 1, sx0: sx1 + 1]
        out[i] = F.interpolate(patch, size=(size, size), mode="area")[0]
    return out


def _nms_min(boxes: Tensor, scores: Tensor, threshold: float) -> Tensor:
    """NMS by intersection over the smaller box: drops a face box nested in a larger one."""
    order = scores.argsort(descending=True)
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    keep = []
    while len(order):
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        iw = (torch.minimum(boxes[i, 2], boxes[rest, 2]) - torch.maximum(boxes[i, 0], boxes[rest, 0]) + 1).clamp(min=0)
        ih = (torch.minimum(boxes[i, 3], boxes[rest, 3]) - torch.maximum(boxes[i, 1], boxes[rest, 1]) + 1).clamp(min=0)
        overlap = iw * ih / torch.minimum(area[i], area[rest])
        order = rest[overlap <= threshold]
    return torch.tensor(keep, dtype=torch.long)


# ---------------------------------------------------------------------------- weights


def read_weights_container(path: Path) -> dict[str, dict[str, Tensor]]:
    """pnet/rnet/onet state_dicts from a facenet-pytorch wheel (or any zip holding
    `.../data/{pnet,rnet,onet}.pt`) or a folder holding the three files."""
    path = Path(path)
    blobs: dict[str, bytes] = {}
    if path.is_dir():
        for name in NETS:
            member = path / f"{name}.pt"
            if member.is_file():
                blobs[name] = member.read_bytes()
    else:
        try:
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    stem = Path(info.filename).name
                    if stem.endswith(".pt") and stem[:-3] in NETS and info.file_size < 32 << 20:
                        blobs[stem[:-3]] = zf.read(info)
        except zipfile.BadZipFile:
            raise FerflowError(f"{path}: face detector weights must be a facenet-pytorch wheel (zip) or a folder "
                               "with pnet.pt, rnet.pt and onet.pt") from None
    missing = [n for n in NETS if n not in blobs]
    if missing:
        raise FerflowError(f"{path}: no {', '.join(f'{n}.pt' for n in missing)} inside; is this the facenet-pytorch "
                           "wheel named in prepare.detector?")
    try:
        return {n: torch.load(io.BytesIO(b), map_location="cpu", weights_only=True) for n, b in blobs.items()}
    except Exception as exc:  # noqa: BLE001 - any refusal of the safe loader is a bad file
        raise FerflowError(f"{path}: face detector weights are not plain tensors ({exc})") from None


# ---------------------------------------------------------------------------- crop boxes


@dataclass(frozen=True)
class FaceCrop:
    """How prepare crops each image: none, a fixed centre square, or around a detected face."""

    mode: str  # "none" | "center" | "detect"
    fraction: float = 1.0  # centre crop side as a fraction of the shorter image side
    fallback: float = 1.0  # detect: centre fraction used when no face is found
    margin: float = 1.3  # detect: square side = margin x the face box's longer side

    @classmethod
    def parse(cls, text: str, margin: float = 1.3) -> "FaceCrop":
        """From a `prepare.face_crop` value (already checked by config.PrepareSettings)."""
        m = FACE_CROP_SYNTAX.match(text.strip())
        if m is None:
            raise FerflowError(f"prepare.face_crop: {text!r} is not none, center:<fraction>, detect or "
                               "detect:<fraction>")
        if m.group("fraction"):
            return cls("center", fraction=float(m.group("fraction")), margin=margin)
        if text.strip().startswith("detect"):
            return cls("detect", fallback=float(m.group("fallback") or 1.0), margin=margin)
        return cls("none", margin=margin)


def center_box(width: int, height: int, fraction: float) -> tuple[int, int, int, int]:
    side = max(1, int(round(min(width, height) * fraction)))
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


def face_box(face: Face, width: int, height: int, margin: float) -> tuple[int, int, int, int]:
    """A square around the detected face, `margin` times its longer side, kept inside the
    image where it fits (shifted, not shrunk), so the crop has the face's own aspect."""
    x0, y0, x1, y1 = face.box
    side = min(max(x1 - x0, y1 - y0) * margin, width, height)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = min(max(cx - side / 2, 0.0), width - side)
    top = min(max(cy - side / 2, 0.0), height - side)
    box = int(round(left)), int(round(top)), int(round(left + side)), int(round(top + side))
    return box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1)


Box = tuple[int, int, int, int]


def crop_box(crop: FaceCrop, image: np.ndarray, detector: Optional[FaceDetector]) -> tuple[Box, str, float]:
    """(box, source, score): source is "none", "center", "detected" or "fallback"."""
    height, width = image.shape[:2]
    if crop.mode == "none":
        return (0, 0, width, height), "none", float("nan")
    if crop.mode == "center":
        return center_box(width, height, crop.fraction), "center", float("nan")
    face = detector.find_face(image) if detector is not None else None
    if face is not None:
        return face_box(face, width, height, crop.margin), "detected", face.score
    return center_box(width, height, crop.fallback), "fallback", float("nan")


def detector_weights(settings: DetectorSettings, fetch: FetchSettings) -> Path:
    """The local weights file of `prepare.detector`, downloaded once into the ferflow cache."""
    path, _ = sources.resolve_file(settings.weights, sources.cache_root() / "detectors", settings.sha256, fetch,
                                   "face detector weights (prepare.detector)")
    return path
