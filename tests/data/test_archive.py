"""Hostile or broken archives, through the path `ferflow prepare` reads them by
(`prepare_dataset` -> `inspect_archive` -> `read_member`, in process and in decode workers):
each is refused with one line naming the archive and the entry, and leaves nothing behind."""

from __future__ import annotations

import io
import json
import stat
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferflow.config import ArchiveSpec, PrepareSettings, SplitSettings
from ferflow.data.archive import inspect_archive, open_zip, read_member
from ferflow.data.prepare import prepare_dataset
from ferflow.fileio import sha256_file
from ferflow.errors import FerflowError

CLASSES = ("negative", "neutral", "positive")


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build(path: Path, extra: list = (), first: list = (), per_class: int = 4,
          compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A valid dataset archive (`per_class` images per split and class) plus `extra` entries
    ((name or ZipInfo, data) pairs) after it and `first` entries before it."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in first:
            zf.writestr(name, data)
        seed = 0
        for split in ("train", "eval"):
            for label in CLASSES:
                for i in range(per_class):
                    seed += 1
                    zf.writestr(f"Set/{split}/{label}/{split}_{label}_{i}_0001.jpg", jpeg(seed))
        for name, data in extra:
            zf.writestr(name, data)
    return path


def special(name: str, mode: int, data: bytes = b"") -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info, data


def prepare(tmp_path: Path, archive: Path, **settings):
    spec = ArchiveSpec(name="Set", uri=str(archive), sha256=sha256_file(archive))
    values = {"image_sizes": [16], "max_bad_fraction": 0.2, "workers": 1, "split": SplitSettings(val_fraction=0.1)}
    values.update(settings)
    return prepare_dataset(spec, archive.parent, tmp_path / "prepared", PrepareSettings(**values))


def assert_refused(tmp_path: Path, archive: Path, *fragments: str, **settings) -> str:
    with pytest.raises(FerflowError) as info:
        prepare(tmp_path, archive, **settings)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    prepared = tmp_path / "prepared"
    assert not prepared.exists() or list(prepared.iterdir()) == [], "a refused archive left output behind"
    return message


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    (tmp_path / "raw").mkdir()
    return tmp_path / "raw"


# ---------------------------------------------------------------------------- accepted


def test_junk_is_skipped_and_listed_in_the_report(tmp_path, raw):
    junk = {
        "__MACOSX/Set/._Set": "macOS resource fork",
        "__MACOSX/Set/train/positive/._a.jpg": "macOS resource fork",
        "Set/.DS_Store": "macOS folder metadata",
        "Set/train/.hidden/x_0001.jpg": "hidden file",
        "Set/train/positive/Thumbs.db": "Windows thumbnail cache",
    }
    result = prepare(tmp_path, build(raw / "Set.zip", [(name, b"junk") for name in junk]))
    assert result.n_images == 24 and result.n_quarantined == 0
    report = json.loads((tmp_path / "prepared/Set/report.json").read_text())
    assert {s["path"]: s["reason"] for s in report["skipped"]} == junk


def test_read_member_returns_the_bytes(tmp_path):
    path = build(tmp_path / "a.zip", [("Set/train/positive/big_0001.jpg", bytes(range(256)) * 20_000)])
    listing = inspect_archive(path, 10**9)
    with open_zip(path) as zf:
        assert read_member(zf, listing, "Set/train/positive/big_0001.jpg") == bytes(range(256)) * 20_000


# ---------------------------------------------------------------------------- refused: names and types


@pytest.mark.parametrize("name", [
    "../evil_0001.jpg", "Set/train/positive/../../../../evil_0001.jpg", "Set/train/positive/..",
    "..\\evil_0001.jpg", "Set\\..\\..\\evil_0001.jpg",
])
def test_zip_slip_refused(tmp_path, raw, name):
    assert_refused(tmp_path, build(raw / "Set.zip", [(name, jpeg(99))]), "Set.zip", repr(name), "outside")
    assert not list(tmp_path.rglob("evil*"))


@pytest.mark.parametrize("name", ["/etc/evil_0001.jpg", "C:\\evil.jpg", "c:/evil.jpg", "\\\\server\\share\\evil",
                                  "\\evil.jpg"])
def test_absolute_paths_refused(tmp_path, raw, name):
    assert_refused(tmp_path, build(raw / "Set.zip", [(name, jpeg(99))]), "Set.zip", repr(name), "absolute")


def test_junk_entry_cannot_hide_traversal(tmp_path, raw):
    assert_refused(tmp_path, build(raw / "Set.zip", [("__MACOSX/../../evil", b"x")]), "__MACOSX/../../evil")


@pytest.mark.parametrize("mode, what", [
    (stat.S_IFLNK | 0o777, "symbolic link"),
    (stat.S_IFCHR | 0o644, "character device"),
    (stat.S_IFBLK | 0o644, "block device"),
    (stat.S_IFIFO | 0o644, "FIFO"),
    (stat.S_IFSOCK | 0o644, "socket"),
])
def test_special_files_refused(tmp_path, raw, mode, what):
    entry = special("Set/train/positive/link_0001.jpg", mode, b"/etc/passwd")
    assert_refused(tmp_path, build(raw / "Set.zip", [entry]), "Set.zip", "'Set/train/positive/link_0001.jpg'", what)


def test_duplicate_entries_refused(tmp_path, raw):
    with pytest.warns(UserWarning):
        archive = build(raw / "Set.zip", [("Set/train/positive/twin_0001.jpg", jpeg(1)),
                                          ("Set/train/positive/twin_0001.jpg", jpeg(2))])
    assert_refused(tmp_path, archive, "'Set/train/positive/twin_0001.jpg'", "more than once")


def test_encrypted_entry_refused(tmp_path, raw):
    archive = build(raw / "Set.zip", first=[("Set/train/positive/secret_0001.jpg", jpeg(99))])
    data = bytearray(archive.read_bytes())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the first entry's headers
        at = data.find(sig) + flag_at
        struct.pack_into("<H", data, at, struct.unpack_from("<H", data, at)[0] | 0x1)
    archive.write_bytes(bytes(data))
    assert_refused(tmp_path, archive, "'Set/train/positive/secret_0001.jpg'", "encrypted")


# ---------------------------------------------------------------------------- refused: the container


def test_not_a_zip(tmp_path, raw):
    (raw / "Set.zip").write_bytes(b"<html>rate limited</html>" * 10)
    assert_refused(tmp_path, raw / "Set.zip", "Set.zip", "not a valid zip archive", "re-fetch")


def test_truncated_zip(tmp_path, raw):
    archive = build(raw / "Set.zip")
    archive.write_bytes(archive.read_bytes()[:-30])  # the central directory's end is gone
    assert_refused(tmp_path, archive, "Set.zip", "not a valid zip archive")


# ---------------------------------------------------------------------------- refused: sizes


def test_over_cap_by_declared_size(tmp_path, raw):
    assert_refused(tmp_path, build(raw / "Set.zip"), "Set.zip", "prepare.max_uncompressed_bytes", "9,999",
                   max_uncompressed_bytes=9_999)


def _understate_first_entry(path: Path, fake: int) -> None:
    """Rewrite the first entry's uncompressed size in its local and central headers (zip bomb trick)."""
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, data.find(b"PK\x03\x04") + 22, fake)
    struct.pack_into("<I", data, data.find(b"PK\x01\x02") + 24, fake)
    path.write_bytes(bytes(data))


BOMB = "Set/train/positive/bomb_0001.jpg"


def test_lying_header_is_not_inflated_in_memory(tmp_path, raw):
    # 128 MiB of zeros deflate to ~130 kB; the headers say 1,000 bytes, so the declared total
    # is far under the cap. zipfile inflated the whole entry in one piece before cutting it to
    # its declared size: a small archive could take gigabytes of memory per decode worker.
    archive = build(raw / "Set.zip", first=[(BOMB, bytes(128 << 20))])
    _understate_first_entry(archive, 1_000)
    tracemalloc.start()
    try:
        assert_refused(tmp_path, archive, "Set.zip", repr(BOMB), "corrupt")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"reading the lying entry took {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("workers", [1, 2])
def test_lying_header_refused_in_decode_workers_too(tmp_path, raw, workers):
    archive = build(raw / "Set.zip", first=[(BOMB, bytes(1 << 20))], per_class=30)
    _understate_first_entry(archive, 100)
    assert_refused(tmp_path, archive, "Set.zip", repr(BOMB), "corrupt", workers=workers)


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_compression_that_cannot_be_bounded_is_refused(tmp_path, raw, compression):
    # zipfile inflates bzip2 and lzma data without a limit (~200 bytes of bzip2 hold 100 MB
    # of zeros), so reading in chunks could not bound their memory.
    archive = build(raw / "Set.zip", compression=compression)
    assert_refused(tmp_path, archive, "Set.zip", "'Set/train/", "deflate")


# ---------------------------------------------------------------------------- refused: damaged data


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    local = data.find(b"PK\x03\x04")
    if how == "crc":  # wrong CRC for the first entry
        struct.pack_into("<I", data, data.find(b"PK\x01\x02") + 16, 0xDEADBEEF)
    else:  # garbage in the middle of the first entry's deflate stream
        name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
        start = local + 30 + name_len + extra_len
        size = struct.unpack_from("<I", data, local + 18)[0]
        data[start + size // 3:start + size // 3 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["crc", "deflate"])
@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_entry_refused(tmp_path, raw, how, workers):
    noise = np.random.default_rng(5).integers(0, 255, 40_000, dtype=np.uint8).tobytes()
    archive = build(raw / "Set.zip", first=[(BOMB, jpeg(99) + noise)], per_class=30)
    _damage(archive, how)
    assert_refused(tmp_path, archive, "Set.zip", repr(BOMB), "corrupt", "re-fetch", workers=workers)
