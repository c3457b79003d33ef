"""Layout discovery over the archive shapes seen in the wild, and identity-grouped splitting."""

from __future__ import annotations

import zipfile
from collections import Counter

import pytest

from ferflow.config import SplitSettings
from ferflow.data.archive import inspect_archive
from ferflow.data.layout import (
    CLASSES,
    ImageEntry,
    assign_splits,
    check_group_leaks,
    discover,
    identity_of,
)
from ferflow.errors import FerflowError


def tree(prefix: str, splits=("train", "eval"), classes=("positive", "negative", "neutral"), n: int = 2) -> list[str]:
    return sorted(
        f"{prefix}{s}/{c}/Training_{i}{s}{c}.jpg" for s in splits for c in classes for i in range(n)
    )


def labels_by_split(entries: list[ImageEntry]) -> Counter:
    return Counter((e.split, e.label) for e in entries)


# ---------------------------------------------------------------------------- identity


@pytest.mark.parametrize(
    "name, identity",
    [
        ("George_W_Bush_0012.jpg", "George_W_Bush"),
        ("LFW-FER/train/positive/Aaron_Peirsol_0003.jpg", "Aaron_Peirsol"),
        ("Madonna_0001.png", "Madonna"),
        ("Training_51903403.jpg", "Training_51903403"),  # 8 digits: not the LFW pattern
        ("Someone_123.jpg", "Someone_123"),
        ("_0001.jpg", "_0001"),
        ("plain.jpg", "plain"),
    ],
)
def test_identity_rule(name, identity):
    assert identity_of(name) == identity


# ---------------------------------------------------------------------------- discover


@pytest.mark.parametrize("prefix", ["", "LFW-FER/", "M-LFW-FER/M-LFW-FER/", "a/b/c/"])
def test_real_world_layouts(prefix):
    files = tree(prefix) + (["README.txt"] if prefix else [])
    entries, skipped = discover(files, "X.zip")
    assert len(entries) == 12
    assert labels_by_split(entries) == {(s, c): 2 for s in ("train", "eval") for c in CLASSES}
    assert all(e.path.startswith(prefix) for e in entries)
    assert skipped == ([{"path": "README.txt", "reason": "not inside a class folder"}] if prefix else [])


def test_extracted_standin_shapes(tmp_path):
    """End to end with zips shaped like the three real archives (junk included)."""
    shapes = {
        "LFW-FER": "LFW-FER/",
        "M-LFW-FER": "M-LFW-FER/M-LFW-FER/",
        "M-LFW-FER-face-cut": "",
    }
    for name, prefix in shapes.items():
        z = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(z, "w") as zf:
            for path in tree(prefix, n=4):
                zf.writestr(path, b"jpeg")
            zf.writestr("__MACOSX/M/._M", b"fork")
            zf.writestr(f"{prefix}.DS_Store", b"ds")
        res = inspect_archive(z, 10**6)
        entries, skipped = discover(res.files, name, dirs=res.dirs)
        assert len(entries) == 24 and skipped == []
        assert labels_by_split(entries)[("eval", "neutral")] == 4


def test_aliases_and_case():
    files = [
        "Data/Train/Positive/a.jpg", "Data/Train/NEGATIVE/b.jpg", "Data/Train/neural/c.jpg",
        "Data/Test/positive/d.jpg", "Data/Test/negative/e.jpg", "Data/Test/Neural/f.jpg",
    ]
    entries, _ = discover(files, "x.zip")
    got = {e.path.rsplit("/", 1)[-1]: (e.split, e.label) for e in entries}
    assert got == {
        "a.jpg": ("train", "positive"), "b.jpg": ("train", "negative"), "c.jpg": ("train", "neutral"),
        "d.jpg": ("eval", "positive"), "e.jpg": ("eval", "negative"), "f.jpg": ("eval", "neutral"),
    }


def test_validation_alias_is_val():
    entries, _ = discover(tree("r/", splits=("train", "validation", "eval")), "x.zip")
    assert {e.split for e in entries} == {"train", "val", "eval"}


def test_no_split_folders():
    files = ["faces/positive/a.jpg", "faces/negative/b.jpg", "faces/neutral/c.jpg", "faces/neutral/sub/d.jpg"]
    entries, skipped = discover(files, "x.zip")
    assert [(e.split, e.label) for e in entries] == [
        (None, "negative"), (None, "neutral"), (None, "neutral"), (None, "positive")
    ]
    assert skipped == []


def test_deeper_subfolders_and_non_images():
    files = tree("") + ["train/positive/extra/deep/z.jpg", "train/positive/notes.txt", "train/loose.jpg"]
    entries, skipped = discover(files, "x.zip")
    deep = [e for e in entries if e.path.endswith("z.jpg")]
    assert deep and deep[0].label == "positive" and deep[0].split == "train"
    assert {s["path"]: s["reason"] for s in skipped} == {
        "train/positive/notes.txt": "not an image file (by extension)",
        "train/loose.jpg": "not inside a class folder",
    }


def test_unknown_class_folder_lists_what_was_found():
    files = tree("L/") + ["L/train/happy/x.jpg"]
    with pytest.raises(FerflowError) as info:
        discover(files, "LFW-FER.zip")
    msg = str(info.value)
    assert "LFW-FER.zip" in msg and "'L/train/happy'" in msg
    assert "found there: happy, negative, neutral, positive" in msg
    assert "accepted: positive, negative, neutral" in msg


def test_empty_class_folder_from_dirs():
    files = [f for f in tree("L/") if "/train/neutral/" not in f]
    with pytest.raises(FerflowError, match=r"L/train/neutral has no images"):
        discover(files, "x.zip", dirs=["L/train/neutral"])


def test_class_folder_with_only_non_images_is_empty():
    files = [f for f in tree("L/") if "/eval/neutral/" not in f] + ["L/eval/neutral/readme.txt"]
    with pytest.raises(FerflowError, match=r"L/eval/neutral has no images"):
        discover(files, "x.zip")


def test_missing_class_in_split():
    files = [f for f in tree("L/") if "/eval/neutral/" not in f]
    with pytest.raises(FerflowError, match=r"x\.zip: L/eval has no neutral folder \(class folders found: negative, positive\)"):
        discover(files, "x.zip")


def test_eval_and_test_is_ambiguous():
    files = tree("L/", splits=("train", "eval", "test"))
    with pytest.raises(FerflowError, match=r"both an eval and a test folder \(L/eval and L/test\)"):
        discover(files, "x.zip")


def test_same_split_twice():
    files = tree("A/") + tree("B/", splits=("train",))
    with pytest.raises(FerflowError, match=r"train split appears in more than one place \(A/train and B/train\)"):
        discover(files, "x.zip")


def test_mixing_split_and_bare_class_folders():
    files = tree("A/") + ["A/positive/stray.jpg"]
    with pytest.raises(FerflowError, match="mixes split folders"):
        discover(files, "x.zip")


def test_same_class_twice_in_split():
    files = tree("A/") + ["A/train/Positive/x.jpg"]
    with pytest.raises(FerflowError, match=r"class 'positive' in split 'train' has several folders"):
        discover(files, "x.zip")


def test_no_images_at_all():
    with pytest.raises(FerflowError, match=r"x\.zip: no class folders.*top-level folders: docs"):
        discover(["docs/README.txt", "LICENSE"], "x.zip")


# ---------------------------------------------------------------------------- assign_splits


def pool(n_per_class: int, split: str | None = None, per_identity: int = 1) -> list[ImageEntry]:
    out = []
    for c in CLASSES:
        for i in range(n_per_class):
            person = f"{split}_{c}_person{i // per_identity}"
            out.append(ImageEntry(f"{split}/{c}/{person}_{i:04d}.jpg", split, c, person))
    return out


def test_unchanged_when_all_splits_present():
    entries = pool(3, "train") + pool(3, "val") + pool(3, "eval")
    assert assign_splits(entries, SplitSettings()) == entries


def test_carves_val_from_train_only():
    entries = pool(100, "train") + pool(20, "eval")
    out = assign_splits(entries, SplitSettings(val_fraction=0.1, seed=1))
    counts = labels_by_split(out)
    for c in CLASSES:
        assert counts[("val", c)] == 10 and counts[("train", c)] == 90 and counts[("eval", c)] == 20
    assert [e for e in out if e.split == "eval"] == [e for e in entries if e.split == "eval"]


def test_val_fraction_zero_leaves_archive_splits():
    entries = pool(10, "train") + pool(5, "eval")
    assert assign_splits(entries, SplitSettings(val_fraction=0)) == entries


def test_deterministic_and_seed_dependent():
    entries = pool(200, "train", per_identity=3) + pool(30, "eval")
    a = assign_splits(entries, SplitSettings(seed=7))
    b = assign_splits(entries, SplitSettings(seed=7))
    c = assign_splits(entries, SplitSettings(seed=8))
    assert a == b
    assert a != c


def test_no_split_folders_three_way_grouped_and_stratified():
    entries = pool(300, None, per_identity=3)
    out = assign_splits(entries, SplitSettings(val_fraction=0.1, eval_fraction=0.2, seed=3))
    assert check_group_leaks(out) == []
    counts = labels_by_split(out)
    for c in CLASSES:
        assert counts[("eval", c)] == pytest.approx(60, abs=3)
        assert counts[("val", c)] == pytest.approx(30, abs=3)
        assert counts[("train", c)] == pytest.approx(210, abs=3)


def test_uneven_groups_never_split():
    # One identity with many images (like LFW's George_W_Bush) among many singletons.
    entries = [ImageEntry(f"p/Big_{i:04d}.jpg", None, "positive", "Big") for i in range(40)]
    entries += [ImageEntry(f"p/s{i}.jpg", None, "positive", f"s{i}") for i in range(60)]
    entries += pool(50)[:100]  # negative + neutral singletons
    out = assign_splits(entries, SplitSettings(seed=5))
    assert check_group_leaks(out) == []
    assert len({e.split for e in out if e.identity == "Big"}) == 1


def test_small_class_gets_every_split():
    entries = pool(50)
    entries = [e for e in entries if e.label != "neutral"] + [
        ImageEntry(f"n/{i}.jpg", None, "neutral", f"n{i}") for i in range(3)
    ]
    out = assign_splits(entries, SplitSettings(seed=0))
    counts = labels_by_split(out)
    assert all(counts[(s, "neutral")] == 1 for s in ("train", "val", "eval"))


def test_too_few_groups_is_a_clear_error():
    entries = [e for e in pool(50) if e.label != "neutral"] + [
        ImageEntry(f"n/Solo_{i:04d}.jpg", None, "neutral", "Solo") for i in range(9)
    ]
    with pytest.raises(FerflowError, match=r"X: cannot give split '(val|eval)' any 'neutral' image.*1 identity group"):
        assign_splits(entries, SplitSettings(), archive_name="X")


def test_val_without_eval_becomes_eval():
    entries = pool(20, "train") + pool(5, "val")
    out = assign_splits(entries, SplitSettings(val_fraction=0.1))
    assert {e.split for e in out if e.path.startswith("val/")} == {"eval"}
    counts = labels_by_split(out)
    assert all(counts[("eval", c)] == 5 and counts[("val", c)] == 2 for c in CLASSES)


def test_no_train_split_is_an_error():
    with pytest.raises(FerflowError, match="no train split"):
        assign_splits(pool(5, "eval"), SplitSettings())


def test_no_eval_and_zero_eval_fraction_is_an_error():
    with pytest.raises(FerflowError, match="eval_fraction is 0"):
        assign_splits(pool(10), SplitSettings(eval_fraction=0))


def test_fractions_leaving_no_train_is_an_error():
    with pytest.raises(FerflowError, match="leaves nothing for train"):
        assign_splits(pool(10), SplitSettings(eval_fraction=0.6, val_fraction=0.5))


def test_archive_made_leak_is_reported_not_fatal():
    entries = pool(30, "train") + pool(10, "eval")
    leaked = ImageEntry("eval/positive/Shared_0001.jpg", "eval", "positive", "Shared")
    entries += [ImageEntry("train/positive/Shared_0002.jpg", "train", "positive", "Shared"), leaked]
    out = assign_splits(entries, SplitSettings(seed=2))
    assert leaked in out
    assert check_group_leaks(out) == ["Shared"]


def test_check_group_leaks():
    entries = [
        ImageEntry("a", "train", "positive", "A"),
        ImageEntry("b", "eval", "positive", "A"),
        ImageEntry("c", "train", "negative", "B"),
        ImageEntry("d", "train", "neutral", "B"),
    ]
    assert check_group_leaks(entries) == ["A"]
