"""Prepare one dataset: check the archive, find the layout, decode every image once, and
write the manifest, the report and the uint8 image caches that training reads.

Images are read straight out of the validated zip (`inspect_archive`): nothing is
extracted to disk, which on small VMs saved more time than decoding costs.

Output, written to a temporary directory and renamed into place only when complete:

    <prepared_dir>/<dataset>/manifest.parquet     one row per kept image
    <prepared_dir>/<dataset>/report.json          counts, quarantine, skipped, duplicates
    <prepared_dir>/<dataset>/cache/<size>/<split>.npy          (N, size, size, 3) uint8
    <prepared_dir>/<dataset>/cache/<size>/<split>.labels.npy   (N,) int64
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
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
from PIL import Image, UnidentifiedImageError

from ferflow.config import ArchiveSpec, PrepareSettings
from ferflow.data import cache as cache_files
from ferflow.data.archive import ArchiveListing, inspect_archive, open_zip, read_member
from ferflow.data.layout import CLASSES, ImageEntry, assign_splits, check_group_leaks, discover
from ferflow.data.sources import verify_file
from ferflow.errors import FerflowError

MANIFEST = "manifest.parquet"
REPORT = "report.json"
SPLIT_ORDER = ("train", "val", "eval")
MANIFEST_COLUMNS = [
    "path", "split", "label", "label_id", "identity", "sha1", "width", "height", "mode", "cache_index",
]
# Decompression-bomb guard for single images (LFW images are 250x250).
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


def decode_image(data: bytes, sizes: list[int]) -> Decoded:
    """Decode once, check it fully, and resize to every cache size (RGB, bilinear)."""
    sha1 = hashlib.sha1(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # forces the full decode: truncated JPEGs fail here, not in training
            width, height, mode = img.width, img.height, img.mode
            rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise _BadImage("cannot decode image: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _BadImage(f"cannot decode image: {exc}") from None
    arrays = {}
    for size in sizes:
        resized = rgb if rgb.size == (size, size) else rgb.resize((size, size), Image.BILINEAR)
        arrays[size] = np.asarray(resized, dtype=np.uint8)
    return Decoded(sha1, width, height, mode, arrays)


class _BadImage(Exception):
    pass


def _decode_member(zf: zipfile.ZipFile, listing: ArchiveListing, path: str, sizes: list[int]) -> Decoded | str:
    """Read one member from the zip (no extraction to disk) and decode it, or say why not."""
    try:
        return decode_image(read_member(zf, listing, path), sizes)
    except _BadImage as exc:
        return str(exc)


# Each worker process opens its own zip handle: a handle inherited through fork would
# share its file offset with the other workers and corrupt their reads.
_worker: dict = {}


def _worker_init(listing: ArchiveListing) -> None:
    _worker["listing"], _worker["zip"] = listing, open_zip(listing.path)


def _worker_decode(path: str, sizes: list[int]) -> Decoded | str:
    return _decode_member(_worker["zip"], _worker["listing"], path, sizes)


def _decode_all(listing: ArchiveListing, paths: list[str], sizes: list[int], workers: int) -> Iterator[Decoded | str]:
    """Decoded images (or the reason they failed) in input order, over `workers` processes."""
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(paths) < 64:
        with open_zip(listing.path) as zf:
            yield from (_decode_member(zf, listing, p, sizes) for p in paths)
        return
    with ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(listing,)) as pool:
        yield from pool.map(_worker_decode, paths, repeat(sizes), chunksize=64)


def prepare_dataset(
    spec: ArchiveSpec, raw_dir: Path, prepared_dir: Path, settings: PrepareSettings
) -> PrepareResult:
    """Turn `<raw_dir>/<name>.zip` into a verified manifest + report + image caches."""
    start = time.perf_counter()
    archive = Path(raw_dir) / f"{spec.name}.zip"
    if not archive.is_file():
        raise FerflowError(f"{archive}: archive not found; run `ferflow fetch` first")
    verify_file(archive, spec)

    prepared_dir = Path(prepared_dir)
    prepared_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=prepared_dir))
    try:
        listing = inspect_archive(archive, settings.max_uncompressed_bytes)
        entries, layout_skipped = discover(listing.files, spec.name, dirs=listing.dirs)
        entries = assign_splits(entries, settings.split, archive_name=spec.name)
        out = work / "out"
        out.mkdir()
        manifest, quarantined = _decode_and_cache(entries, listing, out, settings)
        _check_bad_fraction(spec.name, len(entries), quarantined, settings.max_bad_fraction)
        dupes = _duplicates_across_splits(manifest)
        if dupes and not settings.allow_duplicates_across_splits:
            shown = "; ".join(f"{d['sha1'][:12]}: {', '.join(d['paths'])}" for d in dupes[:5])
            raise FerflowError(
                f"{spec.name}: {len(dupes)} image(s) appear in more than one split ({shown}); "
                "fix the archive or set prepare.allow_duplicates_across_splits=true"
            )
        report = _report(spec, manifest, quarantined, listing.skipped + layout_skipped, dupes, entries, settings)
        manifest.to_parquet(out / MANIFEST, index=False)
        (out / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        _replace_dir(out, prepared_dir / spec.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    return PrepareResult(spec.name, prepared_dir / spec.name, len(manifest), len(quarantined), seconds)


def _decode_and_cache(
    entries: list[ImageEntry], listing: ArchiveListing, out: Path, settings: PrepareSettings
) -> tuple[pd.DataFrame, list[dict]]:
    """One pass over the images: decode, quarantine failures, fill the per-split caches."""
    by_split: dict[str, list[ImageEntry]] = defaultdict(list)
    for entry in sorted(entries, key=lambda e: (e.split or "", e.path)):
        by_split[entry.split].append(entry)
    rows: list[dict] = []
    quarantined: list[dict] = []
    for split in sorted(by_split, key=SPLIT_ORDER.index):
        split_entries = by_split[split]
        writers = {s: cache_files.SplitWriter(out, s, split, len(split_entries)) for s in settings.image_sizes}
        labels: list[int] = []
        decoded = _decode_all(listing, [e.path for e in split_entries], settings.image_sizes, settings.workers)
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
            })
            labels.append(label_id)
        for writer in writers.values():
            writer.close(np.asarray(labels, dtype=np.int64))
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest = manifest.astype({"label_id": "int64", "width": "int64", "height": "int64", "cache_index": "int64"})
    return manifest, quarantined


def _check_bad_fraction(name: str, total: int, quarantined: list[dict], limit: float) -> None:
    if total and len(quarantined) / total > limit:
        shown = "; ".join(f"{q['path']}: {q['reason']}" for q in quarantined[:3])
        raise FerflowError(
            f"{name}: {len(quarantined)} of {total} images could not be decoded "
            f"(more than prepare.max_bad_fraction={limit}): {shown}"
        )


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
    for split in SPLIT_ORDER:
        part = manifest[manifest["split"] == split]
        if len(part):
            tally = Counter(part["label"])
            counts[split] = {c: int(tally.get(c, 0)) for c in CLASSES}
    within = int(manifest.duplicated(subset=["split", "sha1"]).sum())
    return {
        "dataset": spec.name,
        "archive": {"sha256": spec.sha256, "uri": spec.uri},
        "classes": list(CLASSES),
        "counts": counts,
        "n_images": int(len(manifest)),
        "quarantined": quarantined,
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "duplicates_across_splits": dupes,
        "duplicates_within_split": within,
        "identities_in_several_splits": check_group_leaks(entries),
        "image_sizes": list(settings.image_sizes),
        # Content hash of the manifest rows (not the parquet bytes, which embed writer versions).
        "manifest_sha256": manifest_digest(manifest),
    }


def manifest_digest(manifest: pd.DataFrame) -> str:
    return hashlib.sha256(manifest.to_csv(index=False).encode()).hexdigest()


def _replace_dir(src: Path, dest: Path) -> None:
    """Swap a finished output into place; the old one is removed only after the swap."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
