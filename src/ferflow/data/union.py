"""A union dataset (`data.unions`): several prepared archives as one, to train one model
for all of them (e.g. bare, masked and masked face-cut faces together).

Built from the members' prepared data, so nothing is decoded twice: rows and cached images
are gathered from each member. The splits are made again over the union, because the
archives hold the same people (the masked archive is the bare one with masks drawn on):

- every member's eval images stay eval (the held-out sets the results are reported on);
- the members' train and val images form one pool, and val is carved from it by identity,
  so a person's bare and masked photos always land in the same split;
- a person who is in any member's eval split is removed from the pool (counted in the
  report), so no one crosses from training into evaluation through another archive.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from ferflow import layout
from ferflow.config import ArchiveSpec, FetchSettings, PrepareSettings
from ferflow.data import cache as cache_files
from ferflow.data.layout import ImageEntry, assign_splits, check_group_leaks
from ferflow.data.prepare import (MANIFEST_COLUMNS, PrepareResult, check_duplicates, manifest_digest, prepare_dataset,
                                  publish)
from ferflow.data.scratch import scratch_dir, sweep_stale
from ferflow.labels import CLASSES, SPLITS


def prepare_union(name: str, members: list[ArchiveSpec], raw_dir: Path, prepared_dir: Path,
                  settings: PrepareSettings, fetch: FetchSettings | None = None) -> PrepareResult:
    """Gather the members' prepared data into `<prepared_dir>/<name>`. A member prepared with
    other settings (or not at all) is prepared afresh from its archive in a temporary folder,
    so the union depends only on the archives and the settings (its DVC stage says so)."""
    start = time.perf_counter()
    prepared_dir = Path(prepared_dir)
    prepared_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale(prepared_dir)  # a killed union leaves members' caches behind, as a killed prepare does
    scratch = scratch_dir(prepared_dir, name, "members")
    try:
        folders = {}
        for spec in members:
            folders[spec.name] = layout.prepared_dir(prepared_dir, spec.name)
            if not _reusable(folders[spec.name], spec, settings):
                folders[spec.name] = prepare_dataset(spec, raw_dir, scratch, settings, fetch).out_dir
        return _gather(name, folders, prepared_dir, settings, start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _reusable(folder: Path, spec: ArchiveSpec, settings: PrepareSettings) -> bool:
    """A member's prepared data made from this archive with these image sizes and crop."""
    try:
        report = json.loads((folder / layout.REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    crop = report.get("face_crop", {"setting": "none", "margin": settings.face_margin})
    return (report.get("archive", {}).get("sha256") == spec.sha256 and (folder / layout.MANIFEST).is_file()
            and set(settings.image_sizes) <= set(report.get("image_sizes", []))
            and crop.get("setting") == settings.face_crop
            and (settings.face_crop == "none" or crop.get("margin") == settings.face_margin))


def _gather(name: str, folders: dict[str, Path], prepared_dir: Path, settings: PrepareSettings,
            start: float) -> PrepareResult:
    members = list(folders)
    parts = [_member(folders[m], m) for m in members]
    rows = pd.concat([p for p, _ in parts], ignore_index=True)
    in_eval = set(rows.loc[rows["split"] == "eval", "identity"])
    pool = rows["split"] != "eval"
    dropped = rows[pool & rows["identity"].isin(in_eval)]
    rows = rows.drop(index=dropped.index).reset_index(drop=True)
    entries = [ImageEntry(path, "eval" if split == "eval" else "train", label, ident)
               for path, split, label, ident in zip(rows["path"], rows["split"], rows["label"], rows["identity"])]
    # No member val folder survives: val is carved afresh over the union's train pool.
    entries = assign_splits(entries, settings.split, archive_name=name)
    rows["split"] = [e.split for e in entries]

    work = scratch_dir(prepared_dir, name)
    try:
        out = work / "out"
        out.mkdir()
        manifest = _gather_caches(rows, folders, out, settings.image_sizes)
        dupes = check_duplicates(name, manifest, settings)
        report = {
            "dataset": name,
            "members": {m: report["archive"] | {"manifest_sha256": report["manifest_sha256"]} for m, (_, report)
                        in zip(members, parts)},
            "classes": list(CLASSES),
            "counts": {s: {c: int(n) for c, n in Counter(manifest.loc[manifest["split"] == s, "label"]).items()}
                       for s in SPLITS if (manifest["split"] == s).any()},
            "n_images": int(len(manifest)),
            "dropped_identity_in_eval": {"images": int(len(dropped)), "identities": int(dropped["identity"].nunique())},
            "duplicates_across_splits": dupes,
            "identities_in_several_splits": check_group_leaks(entries),
            "image_sizes": list(settings.image_sizes),
            "manifest_sha256": manifest_digest(manifest),
        }
        publish(out, layout.prepared_dir(prepared_dir, name), manifest, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PrepareResult(name, layout.prepared_dir(prepared_dir, name), len(manifest), 0, time.perf_counter() - start)


def _member(folder: Path, member: str) -> tuple[pd.DataFrame, dict]:
    manifest = pd.read_parquet(folder / layout.MANIFEST)
    report = json.loads((folder / layout.REPORT).read_text(encoding="utf-8"))
    if "face" not in manifest:  # prepared before face crops were recorded: whole images
        manifest = manifest.assign(crop_x0=0, crop_y0=0, crop_x1=manifest["width"], crop_y1=manifest["height"],
                                   face="none", face_score=float("nan"))
    manifest = manifest.assign(member=member, member_split=manifest["split"], member_index=manifest["cache_index"],
                               path=member + "/" + manifest["path"])
    return manifest, report


def _gather_caches(rows: pd.DataFrame, folders: dict[str, Path], out: Path, sizes: list[int]) -> pd.DataFrame:
    """Copy each row's cached images from its member into the union's caches, split by split."""
    frames = []
    for split in SPLITS:
        # Grouped by source cache, so the images can be copied in order, a chunk at a time.
        part = rows[rows["split"] == split].sort_values(["member", "member_split", "path"]).reset_index(drop=True)
        if part.empty:
            continue
        part["cache_index"] = np.arange(len(part), dtype=np.int64)
        labels = part["label_id"].to_numpy(dtype=np.int64)
        for size in sizes:
            writer = cache_files.SplitWriter(out, size, split, len(part))
            for (member, member_split), group in part.groupby(["member", "member_split"], sort=False):
                source = cache_files.CachedSplit(folders[member], member_split, size)
                index = group["member_index"].to_numpy()
                for start in range(0, len(index), 512):
                    for image in source.images[index[start:start + 512]]:
                        writer.append(image)
            writer.close(labels)
        frames.append(part)
    return pd.concat(frames, ignore_index=True)[[*MANIFEST_COLUMNS, "member"]]
