"""Demo archives: deterministic, laid out like the real zips, and actually learnable."""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ferflow.config import DemoSettings
from ferflow.data.demo import (
    CLASSES,
    DEMO_ARCHIVES,
    DemoArchive,
    demo_sources,
    generate_demo_archives,
    random_traits,
    render_face,
    render_views,
)

SMALL = DemoSettings(images_per_class=12, image_size=48, eval_fraction=0.25, seed=5)
PREFIX = {"LFW-FER": "LFW-FER/", "M-LFW-FER": "M-LFW-FER/M-LFW-FER/", "M-LFW-FER-face-cut": ""}
LFW_STEM = re.compile(r"^(?P<person>.+)_(?P<index>\d{4})$")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> list[DemoArchive]:
    return generate_demo_archives(SMALL, tmp_path_factory.mktemp("demo_small"))


def images(archive: DemoArchive) -> dict[str, bytes]:
    """{'split/class/file.jpg': bytes} with the archive's own prefix stripped."""
    prefix = PREFIX[archive.name]
    with zipfile.ZipFile(archive.path) as zf:
        return {n[len(prefix):]: zf.read(n) for n in zf.namelist() if n.endswith(".jpg")}


# ---------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_archives(small: list[DemoArchive], tmp_path: Path) -> None:
    again = generate_demo_archives(SMALL, tmp_path)
    assert [a.sha256 for a in again] == [a.sha256 for a in small]
    for a, b in zip(small, again):
        assert a.path.read_bytes() == b.path.read_bytes()


def test_different_seed_gives_different_archives(small: list[DemoArchive], tmp_path: Path) -> None:
    other = generate_demo_archives(SMALL.model_copy(update={"seed": 6}), tmp_path)
    assert all(a.sha256 != b.sha256 for a, b in zip(small, other))


def test_reported_digest_size_and_sums_file_match_disk(small: list[DemoArchive]) -> None:
    out = small[0].path.parent
    assert [a.name for a in small] == list(DEMO_ARCHIVES)
    for a in small:
        data = a.path.read_bytes()
        assert a.path == out / f"{a.name}.zip"
        assert a.sha256 == hashlib.sha256(data).hexdigest() and a.size == len(data)
        assert a.n_images == 3 * SMALL.images_per_class
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert sums == [f"{a.sha256}  {a.name}.zip" for a in small]
    assert sorted(p.name for p in out.iterdir()) == sorted(["SHA256SUMS", *(f"{n}.zip" for n in DEMO_ARCHIVES)])


def test_default_out_dir_is_settings_out_dir(tmp_path: Path) -> None:
    settings = DemoSettings(out_dir=tmp_path / "demo", images_per_class=3, image_size=32)
    archives = generate_demo_archives(settings)
    assert all(a.path.parent == tmp_path / "demo" and a.path.is_file() for a in archives)


def test_demo_sources_are_params_entries(small: list[DemoArchive]) -> None:
    sources = demo_sources(small)
    assert sources == [{"name": a.name, "uri": str(a.path), "sha256": a.sha256, "size": a.size} for a in small]


# ---------------------------------------------------------------------------- structure


@pytest.mark.parametrize("index", range(3))
def test_layout_matches_the_real_archive(small: list[DemoArchive], index: int) -> None:
    archive = small[index]
    with zipfile.ZipFile(archive.path) as zf:
        names = zf.namelist()
        assert names == sorted(names)
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zf.infolist())
    jpgs = [n for n in names if n.endswith(".jpg")]
    junk = [n for n in names if not n.endswith(".jpg")]
    pattern = re.compile(re.escape(PREFIX[archive.name]) + r"(train|eval)/(positive|negative|neutral)/[^/]+\.jpg$")
    assert all(pattern.match(n) for n in jpgs)
    if archive.name == "M-LFW-FER":
        assert any(n.startswith("__MACOSX/M-LFW-FER/._") for n in junk)
        assert any(n.endswith(".DS_Store") for n in junk)
    else:
        assert junk == []


def test_counts_per_split_and_class(small: list[DemoArchive]) -> None:
    n_eval = round(SMALL.images_per_class * SMALL.eval_fraction)
    for archive in small:
        counts = Counter(tuple(k.split("/")[:2]) for k in images(archive))
        for label in CLASSES:
            assert counts[("eval", label)] == n_eval
            assert counts[("train", label)] == SMALL.images_per_class - n_eval


def test_archives_share_images_and_labels(small: list[DemoArchive]) -> None:
    keys = [sorted(images(a)) for a in small]
    assert keys[0] == keys[1] == keys[2]


def test_identities_follow_lfw_naming_and_never_cross_splits(small: list[DemoArchive]) -> None:
    splits_of: dict[str, set[str]] = {}
    labels_of: dict[str, set[str]] = {}
    for key in images(small[0]):
        split, label, fname = key.split("/")
        m = LFW_STEM.match(Path(fname).stem)
        assert m and re.fullmatch(r"Demo_Person_\d{3,}", m["person"])
        splits_of.setdefault(m["person"], set()).add(split)
        labels_of.setdefault(m["person"], set()).add(label)
    assert all(len(s) == 1 for s in splits_of.values())
    assert {next(iter(s)) for s in splits_of.values()} == {"train", "eval"}
    assert any(len(labels) > 1 for labels in labels_of.values())  # persons span classes


def test_every_jpeg_decodes_to_the_configured_size(small: list[DemoArchive]) -> None:
    for archive in small:
        for data in images(archive).values():
            with Image.open(io.BytesIO(data)) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert im.size == (SMALL.image_size, SMALL.image_size)


def test_render_face_shapes_and_label_check() -> None:
    rng = np.random.default_rng(0)
    traits = random_traits(rng)
    face = render_face(rng, "positive", 40, traits)
    assert face.shape == (40, 40, 3) and face.dtype == np.uint8
    views = render_views(np.random.default_rng(1), "negative", 40, traits)
    assert sorted(views) == sorted(DEMO_ARCHIVES)
    assert not np.array_equal(views["LFW-FER"], views["M-LFW-FER"])  # the mask is drawn
    with pytest.raises(ValueError):
        render_face(rng, "happy", 40, traits)


# ---------------------------------------------------------------------------- learnability


def hog(x: np.ndarray, cell: int = 8, bins: int = 9) -> np.ndarray:
    """Cell histograms of gradient orientation: tolerant to the small shifts in pose."""
    gx, gy = np.zeros_like(x), np.zeros_like(x)
    gx[:, :, 1:-1] = x[:, :, 2:] - x[:, :, :-2]
    gy[:, 1:-1] = x[:, 2:] - x[:, :-2]
    mag = np.hypot(gx, gy)
    which = np.minimum(((np.arctan2(gy, gx) % np.pi) / np.pi * bins).astype(int), bins - 1)
    n, h, w = x.shape
    hist = np.stack(
        [(mag * (which == k)).reshape(n, h // cell, cell, w // cell, cell).sum((2, 4)) for k in range(bins)], -1
    )
    hist /= np.linalg.norm(hist, axis=-1, keepdims=True) + 1e-3
    return hist.reshape(n, -1)


def eval_accuracy(archive: DemoArchive) -> float:
    feats, labels, splits = [], [], []
    for key, data in sorted(images(archive).items()):
        split, label, _ = key.split("/")
        with Image.open(io.BytesIO(data)) as im:
            feats.append(np.asarray(im.convert("L"), dtype=np.float32) / 255)
        labels.append(label)
        splits.append(split)
    x, y, s = hog(np.stack(feats)), np.array(labels), np.array(splits)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
    model.fit(x[s == "train"], y[s == "train"])
    return float(model.score(x[s == "eval"], y[s == "eval"]))


def test_expressions_are_learnable_and_masks_make_it_harder(tmp_path: Path) -> None:
    settings = DemoSettings(images_per_class=150, image_size=64, seed=0)
    acc = {a.name: eval_accuracy(a) for a in generate_demo_archives(settings, tmp_path)}
    print(f"eval accuracy, HOG + logistic regression: {acc}")
    assert acc["LFW-FER"] >= 0.6
    assert acc["M-LFW-FER"] > 0.45
    assert acc["M-LFW-FER-face-cut"] > 0.45
