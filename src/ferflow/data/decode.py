"""Decode images the way the caches hold them: one at a time (`decode_image`, and
`decode_photo` for predict and serving), or every image of a validated archive over
worker processes (`decode_all`, prepare's single pass).

Images are read straight out of the zip (ferflow.data.archive.read_member): nothing is
extracted to disk, which on small VMs saved more time than decoding costs.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import multiprocessing
import os
import signal
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ferflow.cpus import available_cpus
from ferflow.data.archive import ArchiveListing, open_zip, read_member
from ferflow.data.faces import FaceCrop, FaceDetector, crop_box, read_weights_container

# Decompression-bomb guard for single images (LFW images are 250x250), for every reader in
# the process; prepare's own, tighter limit is prepare.max_image_pixels.
Image.MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class Decoded:
    """Per-image facts from the single decode; `arrays` holds one resized copy per size."""

    sha1: str
    width: int
    height: int
    mode: str
    arrays: dict[int, np.ndarray]
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # the cached region (x0, y0, x1, y1)
    face: str = "none"
    face_score: float = float("nan")


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def decode_image(data: bytes, sizes: list[int], crop: FaceCrop | None = None,
                 detector: FaceDetector | None = None, interpolation: str = "bilinear",
                 max_pixels: int | None = None) -> Decoded:
    """Decode once, check it fully, crop (prepare.face_crop) and resize to every size (RGB;
    the caches are bilinear, ferflow.models.inference.CACHE_INTERPOLATION). An image of more
    than `max_pixels` (prepare.max_image_pixels) is refused from its header, undecoded."""
    sha1 = hashlib.sha1(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise _BadImage(
                    f"image is {img.width}x{img.height} = {img.width * img.height:,} pixels, over "
                    f"prepare.max_image_pixels={max_pixels:,}; not decoded"
                )
            img.load()  # forces the full decode: truncated JPEGs fail here, not in training
            width, height, mode = img.width, img.height, img.mode
            rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise _BadImage("cannot decode image: not a recognised image format") from None
    except Image.DecompressionBombError as exc:  # PIL's own limit, met before ours could look
        setting = f" (prepare.max_image_pixels={max_pixels:,})" if max_pixels is not None else ""
        raise _BadImage(f"image too large to decode: {exc}{setting}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _BadImage(f"cannot decode image: {exc}") from None
    box, face, score = (0, 0, width, height), "none", float("nan")
    if crop is not None and crop.mode != "none":
        box, face, score = crop_box(crop, np.asarray(rgb), detector)
        rgb = rgb.crop(box)
    arrays = {}
    for size in sizes:
        resized = rgb if rgb.size == (size, size) else rgb.resize((size, size), _RESAMPLE[interpolation])
        arrays[size] = np.asarray(resized, dtype=np.uint8)
    return Decoded(sha1, width, height, mode, arrays, box, face, score)


def decode_photo(data: bytes, preprocess, detector: FaceDetector | None = None) -> Decoded:
    """One photo as a model takes it: `preprocess` (ferflow.models.preprocess.Preprocess, or
    anything with size, face_crop, face_margin and interpolation) applied by the caches' own
    decode, so predict and serving see what prepare gives training."""
    crop = FaceCrop.parse(preprocess.face_crop, preprocess.face_margin)
    return decode_image(data, [preprocess.size], crop, detector, preprocess.interpolation)


class _BadImage(Exception):
    pass


# ---------------------------------------------------------------------------- worker processes


@dataclass(frozen=True)
class Cropping:
    """What every decode needs to crop: the setting and the detector's weights file."""

    crop: FaceCrop
    detector_weights: Path | None = None

    def detector(self) -> FaceDetector | None:
        if self.detector_weights is None:
            return None
        return FaceDetector(read_weights_container(self.detector_weights))


def _decode_member(zf: zipfile.ZipFile, listing: ArchiveListing, path: str, sizes: list[int],
                   crop: FaceCrop | None = None, detector: FaceDetector | None = None,
                   max_pixels: int | None = None) -> Decoded | str:
    """Read one member from the zip (no extraction to disk) and decode it, or say why not."""
    try:
        return decode_image(read_member(zf, listing, path), sizes, crop, detector, max_pixels=max_pixels)
    except _BadImage as exc:
        return str(exc)


def _allow_pixels(max_pixels: int) -> None:
    """PIL refuses images of more than twice its own limit before decode_image can look at
    them: keep that limit at least prepare.max_image_pixels, so raising the setting works."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Have Linux SIGKILL this worker when prepare dies. Without it a `kill -9` of prepare
    (OOM killer, cancelled job) leaves the workers reparented to init, blocked on a pipe
    that nobody reads, forever. Elsewhere there is no such call: a normal exit still ends them."""
    if not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        if prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0),
                 ctypes.c_ulong(0)) != 0:
            return
    except (OSError, AttributeError):
        return
    # The parent may have died before prctl took effect: we were reparented, and no signal will come.
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


# Each worker process opens its own zip handle: a handle inherited through fork would
# share its file offset with the other workers and corrupt their reads.
_worker: dict = {}


def _worker_init(listing: ArchiveListing, cropping: Cropping, max_pixels: int, parent: int) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(1)  # one decode process per core already
    _allow_pixels(max_pixels)
    _worker["listing"], _worker["zip"] = listing, open_zip(listing.path)
    _worker["crop"], _worker["detector"] = cropping.crop, cropping.detector()
    _worker["max_pixels"] = max_pixels


def _worker_decode(path: str, sizes: list[int]) -> Decoded | str:
    return _decode_member(_worker["zip"], _worker["listing"], path, sizes, _worker["crop"], _worker["detector"],
                          _worker["max_pixels"])


def decode_all(listing: ArchiveListing, paths: list[str], sizes: list[int], workers: int,
               cropping: Cropping, max_pixels: int) -> Iterator[Decoded | str]:
    """Decoded images (or the reason they failed) in input order, over `workers` processes."""
    workers = workers or available_cpus()
    _allow_pixels(max_pixels)
    if workers == 1 or len(paths) < 64:
        with open_zip(listing.path) as zf:
            crop, detector = cropping.crop, cropping.detector()
            yield from (_decode_member(zf, listing, p, sizes, crop, detector, max_pixels) for p in paths)
        return
    # torch's thread pools do not survive fork: detector workers start fresh. The method is
    # named on Linux because _die_with_parent needs this process to be the workers' parent
    # (Python 3.14 defaults to forkserver there).
    method = "spawn" if cropping.detector_weights else ("fork" if sys.platform.startswith("linux") else None)
    context = multiprocessing.get_context(method) if method else None
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                             initargs=(listing, cropping, max_pixels, os.getpid())) as pool:
        yield from pool.map(_worker_decode, paths, repeat(sizes), chunksize=64)
