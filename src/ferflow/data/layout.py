"""Find split and class folders in an extracted archive, whatever the wrapping folders, and
make identity-grouped, label-stratified splits where the archive lacks them."""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Iterable

from ferflow.config import SplitSettings
from ferflow.errors import FerflowError
from ferflow.labels import CLASSES

SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "eval": "eval", "test": "eval"}
CLASS_ALIASES = {"positive": "positive", "negative": "negative", "neutral": "neutral", "neural": "neutral"}
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
)

_LFW_STEM = re.compile(r"^(?P<identity>.+)_[0-9]{4}$")
_ACCEPTED = "positive, negative, neutral (or 'neural'), in any letter case"


@dataclass(frozen=True)
class ImageEntry:
    path: str  # relative to the extraction root, posix
    split: str | None  # canonical split; None when the archive has no split folders
    label: str  # canonical class
    identity: str


def identity_of(filename: str) -> str:
    """LFW names are `<Person>_<4 digits>`; any other name is its own identity group."""
    stem = PurePosixPath(filename).stem
    match = _LFW_STEM.match(stem)
    return match.group("identity") if match else stem


def check_group_leaks(entries: Iterable[ImageEntry]) -> list[str]:
    """Identities with images in more than one split (sorted)."""
    splits: dict[str, set] = defaultdict(set)
    for e in entries:
        splits[e.identity].add(e.split)
    return sorted(ident for ident, found in splits.items() if len(found) > 1)


# ---------------------------------------------------------------------------- discovery


def discover(
    files: list[str], archive_name: str, dirs: Iterable[str] = ()
) -> tuple[list[ImageEntry], list[dict]]:
    """Label every image from its folders. `dirs` (optional) lets empty class folders be seen.

    The first folder on a path named like a split or a class is the anchor: a split folder's
    children must be class folders; a class folder holds images at any depth below it.
    """
    all_dirs = _with_parents(list(dirs), files)
    split_dirs = _anchors(all_dirs, SPLIT_ALIASES)
    bare_class_dirs = _anchors(all_dirs, CLASS_ALIASES)
    if split_dirs and bare_class_dirs:
        raise FerflowError(
            f"{archive_name}: mixes split folders ({', '.join(sorted(split_dirs))}) with class folders "
            f"outside any split ({', '.join(sorted(bare_class_dirs))}); cannot tell which split those "
            "images belong to"
        )
    _check_split_roots(split_dirs, archive_name)
    class_dirs = _class_dirs(split_dirs, all_dirs, archive_name) if split_dirs else {
        d: (None, CLASS_ALIASES[_name(d).lower()]) for d in bare_class_dirs
    }
    if not class_dirs:
        raise _no_classes_error(archive_name, all_dirs)
    entries, skipped = _label_files(files, class_dirs)
    _check_classes(class_dirs, split_dirs, entries, archive_name)
    return entries, skipped


def _with_parents(dirs: list[str], files: list[str]) -> set[str]:
    found: set[str] = set()
    for path in [*dirs, *(f.rsplit("/", 1)[0] for f in files if "/" in f)]:
        parts = path.strip("/").split("/")
        found.update("/".join(parts[:i]) for i in range(1, len(parts) + 1) if parts[0])
    return found


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _anchors(all_dirs: set[str], aliases: dict[str, str]) -> set[str]:
    """Dirs named in `aliases` with no split- or class-named folder above them."""
    out = set()
    for d in all_dirs:
        parts = [p.lower() for p in d.split("/")]
        if parts[-1] in aliases and not any(p in SPLIT_ALIASES or p in CLASS_ALIASES for p in parts[:-1]):
            out.add(d)
    return out


def _check_split_roots(split_dirs: set[str], archive: str) -> None:
    by_split: dict[str, list[str]] = defaultdict(list)
    for d in sorted(split_dirs):
        by_split[SPLIT_ALIASES[_name(d).lower()]].append(d)
    for split, found in by_split.items():
        if len(found) < 2:
            continue
        names = {_name(d).lower() for d in found}
        if split == "eval" and names >= {"eval", "test"}:
            raise FerflowError(
                f"{archive}: has both an eval and a test folder ({' and '.join(found)}); which one is "
                "the held-out set is ambiguous, so the archive cannot be used as it is"
            )
        raise FerflowError(
            f"{archive}: the {split} split appears in more than one place ({' and '.join(found)}); "
            "cannot tell which one is meant"
        )


def _class_dirs(split_dirs: set[str], all_dirs: set[str], archive: str) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for sd in sorted(split_dirs):
        children = sorted(d for d in all_dirs if d.rsplit("/", 1)[0] == sd and "/" in d)
        unknown = [c for c in children if _name(c).lower() not in CLASS_ALIASES]
        if unknown:
            found = ", ".join(_name(c) for c in children)
            raise FerflowError(
                f"{archive}: folder {unknown[0]!r} under split folder {sd!r} is not a known class "
                f"(class folders found there: {found}; accepted: {_ACCEPTED})"
            )
        split = SPLIT_ALIASES[_name(sd).lower()]
        out.update({c: (split, CLASS_ALIASES[_name(c).lower()]) for c in children})
    return out


def _label_files(files: list[str], class_dirs: dict[str, tuple]) -> tuple[list[ImageEntry], list[dict]]:
    entries: list[ImageEntry] = []
    skipped: list[dict] = []
    for path in sorted(files):
        owner = _owner_of(path, class_dirs)
        if owner is None:
            skipped.append({"path": path, "reason": "not inside a class folder"})
        elif PurePosixPath(path).suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append({"path": path, "reason": "not an image file (by extension)"})
        else:
            split, label = class_dirs[owner]
            entries.append(ImageEntry(path, split, label, identity_of(path)))
    return entries, skipped


def _check_classes(
    class_dirs: dict[str, tuple], split_dirs: set[str], entries: list[ImageEntry], archive: str
) -> None:
    """Each split (or the whole archive) needs exactly one non-empty folder per class."""
    counts = Counter(_owner_of(e.path, class_dirs) for e in entries)
    by_key: dict[tuple, list[str]] = defaultdict(list)
    for d in sorted(class_dirs):
        by_key[class_dirs[d]].append(d)
    for (split, label), found in by_key.items():
        if len(found) > 1:
            where = f" in split {split!r}" if split else ""
            raise FerflowError(
                f"{archive}: class {label!r}{where} has several folders ({' and '.join(found)}); "
                "cannot tell which one is meant"
            )
        if counts[found[0]] == 0:
            raise FerflowError(f"{archive}: {found[0]} has no images")
    roots = {SPLIT_ALIASES[_name(d).lower()]: d for d in split_dirs} or {None: "the archive"}
    for split, root in sorted(roots.items(), key=lambda kv: kv[0] or ""):
        missing = [c for c in CLASSES if (split, c) not in by_key]
        if missing:
            present = ", ".join(sorted(_name(d) for d, key in class_dirs.items() if key[0] == split))
            raise FerflowError(
                f"{archive}: {root} has no {missing[0]} folder (class folders found: {present or 'none'}); "
                f"every split needs all of {', '.join(CLASSES)}"
            )


def _no_classes_error(archive: str, all_dirs: set[str]) -> FerflowError:
    top = sorted({d.split("/")[0] for d in all_dirs})
    return FerflowError(
        f"{archive}: no class folders, so no images (top-level folders: {', '.join(top) or 'none'}); "
        f"expected folders named {_ACCEPTED}, optionally inside train/val/eval (or test) folders"
    )


def _owner_of(path: str, class_dirs: dict[str, tuple]) -> str | None:
    parts = path.split("/")
    prefixes = ("/".join(parts[:i]) for i in range(1, len(parts)))
    return next((p for p in prefixes if p in class_dirs), None)




# ---------------------------------------------------------------------------- splitting


def assign_splits(
    entries: list[ImageEntry], settings: SplitSettings, archive_name: str = ""
) -> list[ImageEntry]:
    """Give every entry a canonical split, deterministically from `settings.seed`.

    - train, val and eval folders present: unchanged.
    - val but no eval folder: that val is the archive's only held-out set, so it becomes eval.
    - no eval folder (after that rule): `eval_fraction` of the train pool is carved into eval.
    - no val folder: `val_fraction` of the train pool is carved into val (nothing if 0).
    The train pool is the train folder, or every image when there are no split folders.
    Carving moves whole identity groups and only from the train pool, so a group the archive
    itself spreads over train and eval stays as it is (check_group_leaks reports it).
    """
    prefix = f"{archive_name}: " if archive_name else ""
    if not entries:
        raise FerflowError(f"{prefix}no images to split")
    present = {e.split for e in entries}
    if None in present and len(present) > 1:
        raise FerflowError(f"{prefix}some images are in split folders and some are not; cannot split them")
    if "val" in present and "eval" not in present:
        entries = [replace(e, split="eval") if e.split == "val" else e for e in entries]
        present = (present - {"val"}) | {"eval"}
    pool = [e for e in entries if e.split in (None, "train")]
    if not pool:
        raise FerflowError(
            f"{prefix}no train split (found only: {', '.join(sorted(present))}); the archive needs a "
            "train folder, or no split folders at all"
        )
    fractions = _carve_fractions(present, settings, prefix)
    if not fractions:
        return list(entries)
    assigned = _carve(pool, fractions, settings.seed)
    out = [replace(e, split=assigned[e.identity]) if e.split in (None, "train") else e for e in entries]
    _check_coverage(out, pool, ["train", *fractions], prefix)
    return out


def _carve_fractions(present: set, settings: SplitSettings, prefix: str) -> dict[str, float]:
    fractions: dict[str, float] = {}
    if "eval" not in present:
        if settings.eval_fraction <= 0:
            raise FerflowError(
                f"{prefix}the archive has no eval (or test) folder and prepare.split.eval_fraction is 0, "
                "so there would be no held-out set; set prepare.split.eval_fraction above 0"
            )
        fractions["eval"] = settings.eval_fraction
    if "val" not in present and settings.val_fraction > 0:
        fractions["val"] = settings.val_fraction
    if sum(fractions.values()) >= 1:
        raise FerflowError(
            f"{prefix}prepare.split.val_fraction + prepare.split.eval_fraction is "
            f"{sum(fractions.values()):g}, which leaves nothing for train; keep their sum below 1"
        )
    return fractions


def _carve(pool: list[ImageEntry], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """identity -> split. Per class (a group's most common label), largest groups first, each to the
    split furthest below its target; equal-sized groups are ordered by a seeded shuffle."""
    groups: dict[str, list[str]] = defaultdict(list)
    for e in pool:
        groups[e.identity].append(e.label)
    by_label: dict[str, list[str]] = defaultdict(list)
    for ident, labels in groups.items():
        by_label[_primary(labels)].append(ident)
    rng = random.Random(seed)
    assigned: dict[str, str] = {}
    for label in CLASSES:
        idents = sorted(by_label.get(label, []))
        rng.shuffle(idents)
        idents.sort(key=lambda i: len(groups[i]), reverse=True)  # stable: ties keep the shuffle
        members = _fill(idents, {i: len(groups[i]) for i in idents}, fractions)
        assigned.update({i: split for split, ids in members.items() for i in ids})
    return assigned


def _primary(labels: list[str]) -> str:
    counts = Counter(labels)
    return min(counts, key=lambda c: (-counts[c], CLASSES.index(c)))


def _fill(idents: list[str], sizes: dict[str, int], fractions: dict[str, float]) -> dict[str, list[str]]:
    total = sum(sizes.values())
    targets = {"train": total * (1 - sum(fractions.values())), **{s: total * f for s, f in fractions.items()}}
    members: dict[str, list[str]] = {s: [] for s in targets}
    filled = dict.fromkeys(targets, 0)
    for ident in idents:
        split = max(targets, key=lambda s: targets[s] - filled[s])
        members[split].append(ident)
        filled[split] += sizes[ident]
    # Small classes: give every split one group if there are enough, taken from the richest split.
    for split in targets:
        donor = max(targets, key=lambda s: len(members[s]))
        if not members[split] and len(members[donor]) > 1:
            smallest = min(reversed(members[donor]), key=sizes.__getitem__)
            members[donor].remove(smallest)
            members[split].append(smallest)
    return members


def _check_coverage(out: list[ImageEntry], pool: list[ImageEntry], produced: list[str], prefix: str) -> None:
    have = {(e.split, e.label) for e in out}
    for split in produced:
        for label in CLASSES:
            if (split, label) in have:
                continue
            n_groups = len({e.identity for e in pool if e.label == label})
            key = "val_fraction or eval_fraction" if split == "train" else f"{split}_fraction"
            raise FerflowError(
                f"{prefix}cannot give split {split!r} any {label!r} image: the train pool has only "
                f"{n_groups} identity group(s) of that class and a group never spans two splits "
                f"(need {len(produced)}); change prepare.split.{key} or use an archive with more "
                f"{label} images"
            )
