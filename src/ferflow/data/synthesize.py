"""`ferflow synthesize-masks`: masked and masked face-cut variants of any FER archive.

Reads a dataset's verified archive (the same safe reader and layout discovery as prepare),
draws one mask per image (style and colour drawn per image from the chosen sets, seeded by
the image's path, so a rerun writes the same files), and writes two zips in the layout
prepare reads: `<out>.zip` (masked, whole image) and `<out>-face-cut.zip` (the masked face
cropped to its face region and resized back to the image size), each as
`<name>/<split>/<class>/<file>`. Masks are placed from the face detector's landmarks where it
finds a face (`prepare.detector`), else from aligned-face geometry in `face_box`.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ferflow import layout
from ferflow.config import ArchiveSpec, FetchSettings, PrepareSettings
from ferflow.data.archive import inspect_archive, open_zip, read_member
from ferflow.data.faces import FaceDetector, detector_weights, read_weights_container
from ferflow.data.layout import discover
from ferflow.data.masks import COLOURS, STYLES, FaceGeometry, draw_masks, random_looks
from ferflow.data.sources import verify_file
from ferflow.fileio import sha256_file
from ferflow.errors import ConfigError, FerflowError
from ferflow.fileio import atomic_path


@dataclass
class SynthesisResult:
    masked: Path
    face_cut: Optional[Path]
    n_images: int
    placement: Counter = field(default_factory=Counter)  # "landmarks" / "geometry"
    skipped: list[str] = field(default_factory=list)  # images that could not be decoded

    def sha256(self) -> dict[str, str]:
        return {str(p): sha256_file(p) for p in (self.masked, self.face_cut) if p is not None}


def synthesize_masks(
    spec: ArchiveSpec, raw_dir: Path, out: Path, settings: PrepareSettings, fetch: FetchSettings,
    styles: Sequence[str] = STYLES, colours: Sequence[str] = COLOURS, seed: int = 0,
    placement: str = "auto", face_box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
    face_cut: bool = True,
) -> SynthesisResult:
    archive = layout.raw_archive(raw_dir, spec.name)
    if not archive.is_file():
        raise FerflowError(f"{archive}: archive not found; run `ferflow fetch --dataset {spec.name}` first")
    verify_file(archive, spec)
    random_looks(1, torch.device("cpu"), styles, colours)  # unknown names fail before any work
    out = Path(out)
    if out.suffix != ".zip":
        raise ConfigError(f"--out {out}: give a .zip file name")
    detector = _detector(placement, settings, fetch)
    listing = inspect_archive(archive, settings.max_uncompressed_bytes)
    entries, _skipped = discover(listing.files, spec.name, dirs=listing.dirs)
    name = out.stem
    cut_path = out.with_name(f"{name}-face-cut.zip") if face_cut else None
    result = SynthesisResult(out, cut_path, 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:  # both archives or neither: each is renamed in only if all went well
        tmp_masked = stack.enter_context(atomic_path(out))
        tmp_cut = stack.enter_context(atomic_path(cut_path)) if cut_path else None
        with open_zip(archive) as src, zipfile.ZipFile(tmp_masked, "w") as masked_zip, \
                (zipfile.ZipFile(tmp_cut, "w") if tmp_cut else _Nothing()) as cut_zip:
            for entry in sorted(entries, key=lambda e: e.path):
                data = read_member(src, listing, entry.path)
                try:
                    with Image.open(io.BytesIO(data)) as img:
                        rgb = np.asarray(img.convert("RGB"))
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                    result.skipped.append(entry.path)
                    continue
                generator = torch.Generator().manual_seed(_image_seed(seed, entry.path))
                drawn, geometry, how = _draw_one(rgb, detector, face_box, styles, colours, generator)
                result.placement[how] += 1
                result.n_images += 1
                member = f"{name}/{entry.split or 'train'}/{entry.label}/{Path(entry.path).name}"
                masked_zip.writestr(member, _encode(drawn, entry.path))
                if tmp_cut is not None:
                    cut_zip.writestr(member.replace(f"{name}/", f"{name}-face-cut/", 1),
                                     _encode(face_cut_image(drawn, geometry), entry.path))
        if not result.n_images:
            raise FerflowError(f"{archive}: no image could be decoded; nothing written")
    return result


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _detector(placement: str, settings: PrepareSettings, fetch: FetchSettings) -> Optional[FaceDetector]:
    if placement not in ("auto", "landmarks", "geometry"):
        raise ConfigError(f"--placement {placement!r}: expected auto, landmarks or geometry")
    if placement == "geometry" or (placement == "auto" and settings.detector is None):
        return None
    if settings.detector is None:
        raise ConfigError("--placement landmarks needs prepare.detector (the face detector's weights)")
    return FaceDetector(read_weights_container(detector_weights(settings.detector, fetch)))


def _image_seed(seed: int, path: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:8], "little") & (2**63 - 1)


def _draw_one(rgb: np.ndarray, detector: Optional[FaceDetector], face_box, styles, colours,
              generator: torch.Generator) -> tuple[np.ndarray, FaceGeometry, str]:
    h, w = rgb.shape[:2]
    face = detector.find_face(rgb) if detector is not None else None
    if face is not None:
        points = torch.tensor(face.landmarks, dtype=torch.float32) / torch.tensor([w, h], dtype=torch.float32)
        geometry, how = FaceGeometry.from_five_points(points[None]), "landmarks"
    else:
        geometry = FaceGeometry.from_boxes(torch.tensor([face_box], dtype=torch.float32)).jittered(0.05, generator)
        how = "geometry"
    look = random_looks(1, torch.device("cpu"), styles, colours, generator)
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float()
    drawn = draw_masks(image, geometry, look)[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return drawn, geometry, how


def face_cut_image(image: np.ndarray, geometry: FaceGeometry) -> np.ndarray:
    """The face region (a square around eyes and mouth, 2.6 eye distances wide) resized back
    to the image size, as in the M-LFW-FER-face-cut archive."""
    h, w = image.shape[:2]
    scale = np.array([w, h], dtype=np.float64)
    eyes = geometry.eyes[0].double().numpy() * scale
    mouth = geometry.mouth[0].double().numpy() * scale
    centre = (eyes.mean(0) + mouth) / 2
    side = 2.6 * float(np.linalg.norm(eyes[1] - eyes[0]))
    box = (centre[0] - side / 2, centre[1] - side / 2, centre[0] + side / 2, centre[1] + side / 2)
    crop = Image.fromarray(image).crop(tuple(int(round(v)) for v in box))  # outside the image: black
    return np.asarray(crop.resize((w, h), Image.BILINEAR))


def _encode(image: np.ndarray, name: str) -> bytes:
    buf = io.BytesIO()
    if name.lower().endswith((".png", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".ppm", ".webp")):
        Image.fromarray(image).save(buf, format="PNG")
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()
