"""prepare on small crafted archives: manifest/report/cache contract and bad input."""

import io
import json
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ferflow.config import ArchiveSpec, PrepareSettings, SplitSettings
from ferflow.data.cache import CachedSplit
from ferflow.data.prepare import MANIFEST_COLUMNS, prepare_dataset
from ferflow.data.sources import sha256_file
from ferflow.errors import FerflowError

CLASSES = ("negative", "neutral", "positive")


def jpeg(seed: int, size: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_archive(path, extra=None, splits=("train", "eval"), per_class=4, prefix="Set/"):
    """A small archive: `per_class` people per split and class, one image each."""
    seed = 0
    with zipfile.ZipFile(path, "w") as zf:
        for split in splits:
            for label in CLASSES:
                for i in range(per_class):
                    seed += 1
                    name = f"{prefix}{split}/{label}/{split}_{label}_{i}_0001.jpg"
                    zf.writestr(name, jpeg(seed))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def run(tmp_path, archive, **settings):
    spec = ArchiveSpec(name="Set", uri=str(archive), sha256=sha256_file(archive))
    raw = archive.parent
    defaults = {"image_sizes": [16, 8], "max_bad_fraction": 0.2, "split": SplitSettings(val_fraction=0.25)}
    defaults.update(settings)
    return prepare_dataset(spec, raw, tmp_path / "prepared", PrepareSettings(**defaults))


@pytest.fixture
def raw(tmp_path):
    (tmp_path / "raw").mkdir()
    return tmp_path / "raw"


def test_outputs_contract(tmp_path, raw):
    result = run(tmp_path, make_archive(raw / "Set.zip"))
    out = tmp_path / "prepared" / "Set"
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert result.n_images == len(manifest) == 24
    report = json.loads((out / "report.json").read_text())
    assert set(report["counts"]) == {"train", "val", "eval"}
    assert sum(sum(c.values()) for c in report["counts"].values()) == 24
    assert report["counts"]["eval"] == {"negative": 4, "neutral": 4, "positive": 4}
    assert report["quarantined"] == [] and report["duplicates_across_splits"] == []
    assert set(manifest.groupby("identity")["split"].nunique()) == {1}
    assert (manifest["width"] == 20).all() and (manifest["mode"] == "RGB").all()
    for split, rows in manifest.groupby("split"):
        for size in (8, 16):
            cached = CachedSplit(out, split, size)
            assert cached.images.shape == (len(rows), size, size, 3)
            ordered = rows.sort_values("cache_index")
            assert np.array_equal(cached.labels, ordered["label_id"].to_numpy())
    # no temporary directories left beside the output
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["Set"]


def test_cache_pixels_match_a_fresh_decode(tmp_path, raw):
    archive = make_archive(raw / "Set.zip")
    run(tmp_path, archive)
    out = tmp_path / "prepared" / "Set"
    manifest = pd.read_parquet(out / "manifest.parquet")
    row = manifest[manifest["split"] == "eval"].iloc[0]
    with zipfile.ZipFile(archive) as zf, Image.open(io.BytesIO(zf.read(row["path"]))) as img:
        expected = np.asarray(img.convert("RGB").resize((16, 16), Image.BILINEAR))
    assert np.array_equal(CachedSplit(out, "eval", 16).images[row["cache_index"]], expected)


def test_corrupt_and_non_image_files_are_quarantined(tmp_path, raw):
    extra = {
        "Set/train/positive/broken_0001.jpg": jpeg(999)[:200],  # truncated JPEG
        "Set/train/negative/notes_0001.jpg": b"this is text, not a picture",
    }
    result = run(tmp_path, make_archive(raw / "Set.zip", extra))
    report = json.loads((tmp_path / "prepared" / "Set" / "report.json").read_text())
    reasons = {q["path"]: q["reason"] for q in report["quarantined"]}
    assert set(reasons) == set(extra)
    assert all("cannot decode" in r for r in reasons.values())
    assert result.n_quarantined == 2 and result.n_images == 24


def test_too_many_bad_images_fails_and_writes_nothing(tmp_path, raw):
    extra = {f"Set/train/positive/bad{i}_0001.jpg": b"junk" for i in range(6)}
    with pytest.raises(FerflowError, match="prepare.max_bad_fraction"):
        run(tmp_path, make_archive(raw / "Set.zip", extra), max_bad_fraction=0.1)
    assert list((tmp_path / "prepared").iterdir()) == []


def test_same_image_in_train_and_eval(tmp_path, raw):
    same = jpeg(4242)
    extra = {"Set/train/neutral/twin_a_0001.jpg": same, "Set/eval/neutral/twin_b_0001.jpg": same}
    archive = make_archive(raw / "Set.zip", extra)
    with pytest.raises(FerflowError, match="appear in more than one split"):
        run(tmp_path, archive)
    assert list((tmp_path / "prepared").iterdir()) == []
    run(tmp_path, archive, allow_duplicates_across_splits=True)
    report = json.loads((tmp_path / "prepared" / "Set" / "report.json").read_text())
    [dupe] = report["duplicates_across_splits"]
    # the train twin may have been carved into val; either way it sits beside eval
    assert "eval" in dupe["splits"] and len(dupe["splits"]) == 2
    assert dupe["paths"] == sorted(extra)


def test_failure_keeps_the_previous_good_output(tmp_path, raw):
    archive = make_archive(raw / "Set.zip")
    run(tmp_path, archive)
    before = (tmp_path / "prepared" / "Set" / "report.json").read_text()
    bad = make_archive(raw / "Set.zip", {"Set/train/angry/x_0001.jpg": jpeg(1)})
    with pytest.raises(FerflowError, match="angry"):
        run(tmp_path, bad)
    assert (tmp_path / "prepared" / "Set" / "report.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["Set"]


def test_archive_changed_since_fetch_is_refused(tmp_path, raw):
    archive = make_archive(raw / "Set.zip")
    spec = ArchiveSpec(name="Set", uri=str(archive), sha256="0" * 64)
    with pytest.raises(FerflowError, match="does not match sha256"):
        prepare_dataset(spec, raw, tmp_path / "prepared", PrepareSettings())


def test_missing_archive_says_fetch_first(tmp_path):
    spec = ArchiveSpec(name="Nope", uri="x.zip", sha256="0" * 64)
    with pytest.raises(FerflowError, match="ferflow fetch"):
        prepare_dataset(spec, tmp_path, tmp_path / "prepared", PrepareSettings())


def test_worker_processes_give_identical_outputs(tmp_path, raw):
    archive = make_archive(raw / "Set.zip", per_class=30, extra={"Set/train/neutral/bad_0001.jpg": b"junk"})
    outputs = {}
    for workers in (1, 2):
        spec = ArchiveSpec(name="Set", uri=str(archive), sha256=sha256_file(archive))
        dest = tmp_path / f"w{workers}"
        settings = PrepareSettings(image_sizes=[16], workers=workers, split=SplitSettings(val_fraction=0.2))
        prepare_dataset(spec, raw, dest, settings)
        outputs[workers] = dest / "Set"
    one, two = (pd.read_parquet(outputs[w] / "manifest.parquet") for w in (1, 2))
    pd.testing.assert_frame_equal(one, two)
    assert (one["split"] == "train").sum() >= 64  # the parallel path really ran
    for split in ("train", "val", "eval"):
        assert np.array_equal(CachedSplit(outputs[1], split, 16).images, CachedSplit(outputs[2], split, 16).images)
    reports = [json.loads((outputs[w] / "report.json").read_text()) for w in (1, 2)]
    assert reports[0] == reports[1] and len(reports[0]["quarantined"]) == 1


def _hostile(path, kind):
    import stat

    if kind == "not-a-zip":
        path.write_bytes(b"PK\x03\x04 this is not really a zip archive")
        return path
    make_archive(path)
    with zipfile.ZipFile(path, "a") as zf:
        if kind == "zip-slip":
            zf.writestr("Set/train/positive/../../../../evil_0001.jpg", jpeg(7))
        elif kind == "absolute":
            zf.writestr("/etc/evil_0001.jpg", jpeg(7))
        elif kind == "symlink":
            info = zipfile.ZipInfo("Set/train/positive/link_0001.jpg")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize("kind, message", [
    ("not-a-zip", "not a valid zip"), ("zip-slip", "outside"), ("absolute", "absolute path"),
    ("symlink", "symbolic link"),
])
def test_hostile_archives_are_refused_before_any_output(tmp_path, raw, kind, message):
    archive = _hostile(raw / "Set.zip", kind)
    with pytest.raises(FerflowError, match=message):
        run(tmp_path, archive)
    assert not (tmp_path / "prepared").exists() or list((tmp_path / "prepared").iterdir()) == []
    assert not list(tmp_path.rglob("evil*"))
