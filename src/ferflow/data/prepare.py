"""Prepare one dataset: check the archive, find the layout, decode every image once, and
write the manifest, the report and the uint8 image caches that training reads.

Images are decoded straight out of the validated zip (`inspect_archive`, then
ferflow.data.decode over worker processes); nothing is extracted to disk.

Output, written to a temporary directory and renamed into place only when complete (a run
killed before that leaves the directory, named after its process, and the next run removes
it: ferflow.data.scratch):

    <prepared_dir>/<dataset>/manifest.parquet     one row per kept image
    <prepared_dir>/<dataset>/report.json          counts, quarantine, skipped, duplicates
    <prepared_dir>/<dataset>/cache/<size>/<split>.npy          (N, size, size, 3) uint8
    <prepared_dir>/<dataset>/cache/<size>/<split>.labels.npy   (N,) int64
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ferflow import layout
from ferflow.config import ArchiveSpec, FetchSettings, PrepareSettings
from ferflow.data import cache as cache_files
from ferflow.data.archive import ArchiveListing, inspect_archive
from ferflow.data.decode import Cropping, decode_all
from ferflow.data.faces import FaceCrop, detector_weights, read_weights_container
from ferflow.data.layout import ImageEntry, assign_splits, check_group_leaks, discover
from ferflow.data.scratch import replace_dir, scratch_dir, sweep_stale
from ferflow.data.sources import verify_file
from ferflow.redact import redact_uri
from ferflow.errors import FerflowError
from ferflow.labels import CLASSES, SPLITS

MANIFEST_COLUMNS = [
    "path", "split", "label", "label_id", "identity", "sha1", "width", "height", "mode", "cache_index",
    # The region of the image that was cached (prepare.face_crop), in its pixels, and how it
    # was chosen: none (whole image), center, detected (a face) or fallback (no face found).
    "crop_x0", "crop_y0", "crop_x1", "crop_y1", "face", "face_score",
]


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


def prepare_dataset(
    spec: ArchiveSpec, raw_dir: Path, prepared_dir: Path, settings: PrepareSettings,
    fetch_settings: FetchSettings | None = None,
) -> PrepareResult:
    """Turn `<raw_dir>/<name>.zip` into a verified manifest + report + image caches."""
    start = time.perf_counter()
    archive = layout.raw_archive(raw_dir, spec.name)
    if not archive.is_file():
        raise FerflowError(f"{archive}: archive not found; run `ferflow fetch` first")
    verify_file(archive, spec)
    crop = FaceCrop.parse(settings.face_crop, settings.face_margin)
    weights = None
    if crop.mode == "detect":  # before any work: a missing or wrong file fails here
        weights = detector_weights(settings.detector, fetch_settings or FetchSettings())
        read_weights_container(weights)
    cropping = Cropping(crop, weights)

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
    entries: list[ImageEntry], listing: ArchiveListing, out: Path, settings: PrepareSettings, cropping: Cropping
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
        decoded = decode_all(listing, [e.path for e in split_entries], settings.image_sizes, settings.workers,
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
    replace_dir(out, dest)


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
