"""Prepare one dataset: check the archive, find the layout, decode every image once, and
write the manifest, the report and the uint8 image caches that training reads.

Images are read straight out of the validated zip (`inspect_archive`): nothing is
extracted to disk, which on small VMs saved more time than decoding costs.

Output, written to a temporary directory and renamed into place only when complete (a run
killed before that leaves the directory, named after its process, and the next run removes
it: `sweep_stale`):

    <prepared_dir>/<dataset>/manifest.parquet     one row per kept image
    <prepared_dir>/<dataset>/report.json          counts, quarantine, skipped, duplicates
    <prepared_dir>/<dataset>/cache/<size>/<split>.npy          (N, size, size, 3) uint8
    <prepared_dir>/<dataset>/cache/<size>/<split>.labels.npy   (N,) int64
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from ferflow import layout
from ferflow.config import ArchiveSpec, FetchSettings, PrepareSettings
from ferflow.cpus import available_cpus
from ferflow.data import cache as cache_files
from ferflow.data.archive import ArchiveListing, inspect_archive, open_zip, read_member
from ferflow.data.faces import FaceCrop, FaceDetector, crop_box, detector_weights, read_weights_container
from ferflow.data.layout import ImageEntry, assign_splits, check_group_leaks, discover
from ferflow.data.sources import verify_file
from ferflow.redact import redact_uri
from ferflow.errors import FerflowError
from ferflow.labels import CLASSES, SPLITS

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "path", "split", "label", "label_id", "identity", "sha1", "width", "height", "mode", "cache_index",
    # The region of the image that was cached (prepare.face_crop), in its pixels, and how it
    # was chosen: none (whole image), center, detected (a face) or fallback (no face found).
    "crop_x0", "crop_y0", "crop_x1", "crop_y1", "face", "face_score",
]
# Decompression-bomb guard for single images (LFW images are 250x250), for every reader in
# the process; prepare's own, tighter limit is prepare.max_image_pixels.
Image.MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class PrepareResult:
    dataset: str
    out_dir: Path
    n_images: int
    n_quarantined: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("inf")


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


@dataclass(frozen=True)
class _Cropping:
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


def _worker_init(listing: ArchiveListing, cropping: _Cropping, max_pixels: int, parent: int) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(1)  # one decode process per core already
    _allow_pixels(max_pixels)
    _worker["listing"], _worker["zip"] = listing, open_zip(listing.path)
    _worker["crop"], _worker["detector"] = cropping.crop, cropping.detector()
    _worker["max_pixels"] = max_pixels


def _worker_decode(path: str, sizes: list[int]) -> Decoded | str:
    return _decode_member(_worker["zip"], _worker["listing"], path, sizes, _worker["crop"], _worker["detector"],
                          _worker["max_pixels"])


def _decode_all(listing: ArchiveListing, paths: list[str], sizes: list[int], workers: int,
                cropping: _Cropping, max_pixels: int) -> Iterator[Decoded | str]:
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


def prepare_dataset(
    spec: ArchiveSpec, raw_dir: Path, prepared_dir: Path, settings: PrepareSettings,
    fetch_settings: FetchSettings | None = None,
) -> PrepareResult:
    """Turn `<raw_dir>/<name>.zip` into a verified manifest + report + image caches."""
    start = time.perf_counter()
    archive = Path(raw_dir) / f"{spec.name}.zip"
    if not archive.is_file():
        raise FerflowError(f"{archive}: archive not found; run `ferflow fetch` first")
    verify_file(archive, spec)
    crop = FaceCrop.parse(settings.face_crop, settings.face_margin)
    weights = None
    if crop.mode == "detect":  # before any work: a missing or wrong file fails here
        weights = detector_weights(settings.detector, fetch_settings or FetchSettings())
        read_weights_container(weights)
    cropping = _Cropping(crop, weights)

    prepared_dir = Path(prepared_dir)
    prepared_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale(prepared_dir)
    work = scratch_dir(prepared_dir, spec.name)
    dest = layout.prepared_dir(prepared_dir, spec.name)
    try:
        listing = inspect_archive(archive, settings.max_uncompressed_bytes)
        entries, layout_skipped = discover(listing.files, spec.name, dirs=listing.dirs)
        entries = assign_splits(entries, settings.split, archive_name=spec.name)
        out = work / "out"
        out.mkdir()
        manifest, quarantined = _decode_and_cache(entries, listing, out, settings, cropping)
        _check_bad_fraction(spec.name, len(entries), quarantined, settings.max_bad_fraction)
        dupes = check_duplicates(spec.name, manifest, settings)
        report = _report(spec, manifest, quarantined, listing.skipped + layout_skipped, dupes, entries, settings)
        publish(out, dest, manifest, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    return PrepareResult(spec.name, dest, len(manifest), len(quarantined), seconds)


def _decode_and_cache(
    entries: list[ImageEntry], listing: ArchiveListing, out: Path, settings: PrepareSettings, cropping: _Cropping
) -> tuple[pd.DataFrame, list[dict]]:
    """One pass over the images: decode, quarantine failures, fill the per-split caches."""
    by_split: dict[str, list[ImageEntry]] = defaultdict(list)
    for entry in sorted(entries, key=lambda e: (e.split or "", e.path)):
        by_split[entry.split].append(entry)
    rows: list[dict] = []
    quarantined: list[dict] = []
    for split in sorted(by_split, key=SPLITS.index):
        split_entries = by_split[split]
        writers = {s: cache_files.SplitWriter(out, s, split, len(split_entries)) for s in settings.image_sizes}
        labels: list[int] = []
        decoded = _decode_all(listing, [e.path for e in split_entries], settings.image_sizes, settings.workers,
                              cropping, settings.max_image_pixels)
        for entry, img in zip(split_entries, decoded):
            if isinstance(img, str):
                quarantined.append({"path": entry.path, "reason": img})
                continue
            for size, writer in writers.items():
                writer.append(img.arrays[size])
            label_id = CLASSES.index(entry.label)
            rows.append({
                "path": entry.path, "split": split, "label": entry.label, "label_id": label_id,
                "identity": entry.identity, "sha1": img.sha1, "width": img.width,
                "height": img.height, "mode": img.mode, "cache_index": len(labels),
                "crop_x0": img.box[0], "crop_y0": img.box[1], "crop_x1": img.box[2], "crop_y1": img.box[3],
                "face": img.face, "face_score": img.face_score,
            })
            labels.append(label_id)
        for writer in writers.values():
            writer.close(np.asarray(labels, dtype=np.int64))
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest = manifest.astype({"label_id": "int64", "width": "int64", "height": "int64", "cache_index": "int64",
                                **{c: "int64" for c in ("crop_x0", "crop_y0", "crop_x1", "crop_y1")},
                                "face_score": "float64"})
    return manifest, quarantined


def _check_bad_fraction(name: str, total: int, quarantined: list[dict], limit: float) -> None:
    if total and len(quarantined) / total > limit:
        shown = "; ".join(f"{q['path']}: {q['reason']}" for q in quarantined[:3])
        raise FerflowError(
            f"{name}: {len(quarantined)} of {total} images could not be decoded "
            f"(more than prepare.max_bad_fraction={limit}): {shown}"
        )


def check_duplicates(name: str, manifest: pd.DataFrame, settings: PrepareSettings) -> list[dict]:
    """Images whose content is in more than one split: refused unless allowed (then reported)."""
    dupes = _duplicates_across_splits(manifest)
    if dupes and not settings.allow_duplicates_across_splits:
        shown = "; ".join(f"{d['sha1'][:12]}: {', '.join(d['paths'])}" for d in dupes[:5])
        raise FerflowError(
            f"{name}: {len(dupes)} image(s) appear in more than one split ({shown}); "
            "fix the archive or set prepare.allow_duplicates_across_splits=true"
        )
    return dupes


def publish(out: Path, dest: Path, manifest: pd.DataFrame, report: dict) -> None:
    """Write manifest and report beside the caches in `out`, then swap `out` into `dest`."""
    manifest.to_parquet(out / layout.MANIFEST, index=False)
    (out / layout.REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    _replace_dir(out, dest)


def _duplicates_across_splits(manifest: pd.DataFrame) -> list[dict]:
    splits_per_hash = manifest.groupby("sha1")["split"].nunique()
    shared = manifest[manifest["sha1"].isin(splits_per_hash.index[splits_per_hash > 1])]
    found = []
    for sha1, group in shared.groupby("sha1", sort=True):
        found.append({
            "sha1": sha1,
            "paths": sorted(group["path"]),
            "splits": sorted(group["split"].unique()),
        })
    return found


def _report(
    spec: ArchiveSpec,
    manifest: pd.DataFrame,
    quarantined: list[dict],
    skipped: list[dict],
    dupes: list[dict],
    entries: list[ImageEntry],
    settings: PrepareSettings,
) -> dict:
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        part = manifest[manifest["split"] == split]
        if len(part):
            tally = Counter(part["label"])
            counts[split] = {c: int(tally.get(c, 0)) for c in CLASSES}
    within = int(manifest.duplicated(subset=["split", "sha1"]).sum())
    return {
        "dataset": spec.name,
        "archive": {"sha256": spec.sha256, "uri": redact_uri(spec.uri)},
        "classes": list(CLASSES),
        "counts": counts,
        "n_images": int(len(manifest)),
        "quarantined": quarantined,
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "duplicates_across_splits": dupes,
        "duplicates_within_split": within,
        "identities_in_several_splits": check_group_leaks(entries),
        "image_sizes": list(settings.image_sizes),
        # How many images were cropped around a detected face, and how many fell back.
        "face_crop": {"setting": settings.face_crop, "margin": settings.face_margin,
                      "counts": {k: int(v) for k, v in sorted(Counter(manifest["face"]).items())}},
        # Content hash of the manifest rows (not the parquet bytes, which embed writer versions).
        "manifest_sha256": manifest_digest(manifest),
    }


def manifest_digest(manifest: pd.DataFrame) -> str:
    return hashlib.sha256(manifest.to_csv(index=False).encode()).hexdigest()


def _replace_dir(src: Path, dest: Path) -> None:
    """Swap a finished output into place; the old one is removed only after the swap."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{_owner()}-{os.urandom(4).hex()}")
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- leftovers of killed runs
#
# A run killed with SIGKILL (OOM killer, cancelled job) runs no cleanup, and its temporary
# folder holds a dataset's worth of caches. Each temporary folder's name says who owns it:
# `.<dataset>.<kind>-<host tag>-<pid>-<random>`; a later run removes those whose owner is
# gone. The host tag (host name and pid namespace) keeps a run from judging pids of another
# machine or container that shares the folder: their leftovers are left alone.

_SCRATCH = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|members|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-.+")


def _host_tag() -> str:
    ident = socket.gethostname()
    try:
        ident += os.readlink("/proc/self/ns/pid")
    except OSError:
        pass  # no /proc: the host name alone
    return hashlib.sha1(ident.encode()).hexdigest()[:8]


def _owner() -> str:
    return f"{_host_tag()}-{os.getpid()}"


def scratch_dir(parent: Path, name: str, kind: str = "tmp") -> Path:
    """A new temporary folder in `parent` for `name`, named after this process (see sweep_stale)."""
    return Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{_owner()}-", dir=parent))


def sweep_stale(parent: Path) -> None:
    """Remove the temporary folders in `parent` of runs on this host that died; a folder of
    a live run (a concurrent prepare) is never touched."""
    host = _host_tag()
    for path in sorted(Path(parent).iterdir()):
        found = _SCRATCH.fullmatch(path.name)
        if found is None or found["host"] != host or _alive(int(found["pid"])):
            continue
        dest = path.with_name(found["name"])
        if found["kind"] == "old" and not dest.exists():
            # Killed between the two renames of _replace_dir: this is the only output left.
            try:
                os.replace(path, dest)
                log.warning("restored %s, moved aside by an interrupted run (process %s)", dest, found["pid"])
            except OSError:
                pass  # another run got there first; a later sweep removes this copy
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by an interrupted run (process %s)", path, found["pid"])


def _alive(pid: int) -> bool:
    """Whether process `pid` may still use its folder; when unsure, yes."""
    if pid <= 0 or pid == os.getpid():
        return True  # never ours to judge (0 would signal our own process group)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a pid beyond this system's range: keep it)
    try:  # a zombie (killed, not yet reaped by its parent) does nothing more
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True
