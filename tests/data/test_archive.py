"""safe_extract: hostile or broken archives are refused and leave nothing behind."""

from __future__ import annotations

import io
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from ferflow.data import archive as archive_mod
from ferflow.data.archive import safe_extract
from ferflow.errors import FerflowError

CAP = 10_000_000


def make_zip(path: Path, entries: list) -> Path:
    """entries: (name, data) pairs or (ZipInfo, data) pairs."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def special(name: str, mode: int, data: bytes = b"") -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info, data


def snapshot(parent: Path) -> set[str]:
    return {str(p.relative_to(parent)) for p in parent.rglob("*")}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    parent = tmp_path / "out"
    parent.mkdir()
    (parent / "keep.txt").write_text("untouched")
    return parent


def assert_refused(zip_path: Path, out: Path, *fragments: str, cap: int = CAP) -> FerflowError:
    before = snapshot(out)
    with pytest.raises(FerflowError) as info:
        safe_extract(zip_path, out / "dest", cap)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert snapshot(out) == before
    return info.value


def test_extracts_files_and_dirs(tmp_path, out):
    z = make_zip(tmp_path / "a.zip", [("top/train/positive/A_0001.jpg", b"x" * 10), ("top/README.txt", b"hi")])
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr(zipfile.ZipInfo("top/train/neutral/"), b"")
    res = safe_extract(z, out / "dest", CAP)
    assert res.root == out / "dest"
    assert res.files == ["top/README.txt", "top/train/positive/A_0001.jpg"]
    assert res.dirs == ["top", "top/train", "top/train/neutral", "top/train/positive"]
    assert res.uncompressed_bytes == 12
    assert res.skipped == []
    assert (out / "dest/top/train/positive/A_0001.jpg").read_bytes() == b"x" * 10
    assert (out / "dest/top/train/neutral").is_dir()
    assert snapshot(out) - {"keep.txt"} == {"dest"} | {f"dest/{p}" for p in res.files + res.dirs}


def test_junk_is_skipped_and_listed(tmp_path, out):
    z = make_zip(tmp_path / "j.zip", [
        ("M/train/positive/a.jpg", b"1"),
        ("__MACOSX/M/._M", b"fork"),
        ("__MACOSX/M/train/positive/._a.jpg", b"fork"),
        ("M/.DS_Store", b"ds"),
        ("M/train/.hidden/x.jpg", b"h"),
        ("M/train/positive/Thumbs.db", b"t"),
    ])
    res = safe_extract(z, out / "dest", CAP)
    assert res.files == ["M/train/positive/a.jpg"]
    reasons = {s["path"]: s["reason"] for s in res.skipped}
    assert reasons == {
        "__MACOSX/M/._M": "macOS resource fork",
        "__MACOSX/M/train/positive/._a.jpg": "macOS resource fork",
        "M/.DS_Store": "macOS folder metadata",
        "M/train/.hidden/x.jpg": "hidden file",
        "M/train/positive/Thumbs.db": "Windows thumbnail cache",
    }
    assert not (out / "dest/__MACOSX").exists()
    assert not (out / "dest/M/.DS_Store").exists()


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "a/..", "..\\evil.txt", "a\\..\\..\\evil"])
def test_zip_slip_refused(tmp_path, out, name):
    z = make_zip(tmp_path / "slip.zip", [("ok/positive/a.jpg", b"1"), (name, b"evil")])
    assert_refused(z, out, "slip.zip", repr(name), "outside")
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("name", ["/etc/evil", "C:\\evil", "c:/evil", "\\\\server\\share\\evil", "\\evil"])
def test_absolute_paths_refused(tmp_path, out, name):
    z = make_zip(tmp_path / "abs.zip", [("ok/a.jpg", b"1"), (name, b"evil")])
    assert_refused(z, out, "abs.zip", repr(name), "absolute")


def test_junk_entry_cannot_hide_traversal(tmp_path, out):
    z = make_zip(tmp_path / "mac.zip", [("ok/a.jpg", b"1"), ("__MACOSX/../../evil", b"x")])
    assert_refused(z, out, "__MACOSX/../../evil")


@pytest.mark.parametrize(
    "mode, what",
    [
        (stat.S_IFLNK | 0o777, "symbolic link"),
        (stat.S_IFCHR | 0o644, "character device"),
        (stat.S_IFBLK | 0o644, "block device"),
        (stat.S_IFIFO | 0o644, "FIFO"),
        (stat.S_IFSOCK | 0o644, "socket"),
    ],
)
def test_special_files_refused(tmp_path, out, mode, what):
    z = make_zip(tmp_path / "sp.zip", [("ok/a.jpg", b"1"), special("ok/link", mode, b"/etc/passwd")])
    assert_refused(z, out, "sp.zip", "'ok/link'", what)


def test_not_a_zip(tmp_path, out):
    bad = tmp_path / "notzip.zip"
    bad.write_bytes(b"<html>rate limited</html>" * 10)
    assert_refused(bad, out, "notzip.zip", "not a valid zip archive", "re-fetch")


def test_truncated_zip(tmp_path, out):
    z = make_zip(tmp_path / "t.zip", [("ok/a.jpg", b"abc" * 1000), ("ok/b.jpg", b"def" * 1000)])
    z.write_bytes(z.read_bytes()[:-30])
    assert_refused(z, out, "t.zip", "not a valid zip archive")


def test_missing_archive(tmp_path, out):
    assert_refused(tmp_path / "nope.zip", out, "nope.zip", "not found")


def test_over_cap_by_declared_size(tmp_path, out):
    z = make_zip(tmp_path / "big.zip", [("ok/a.jpg", b"\0" * 5000), ("ok/b.jpg", b"\0" * 5000)])
    assert_refused(z, out, "big.zip", "prepare.max_uncompressed_bytes", "9,999", cap=9_999)


def _understate_size(path: Path, real: int, fake: int) -> None:
    """Rewrite the uncompressed size in the local and central headers (zip bomb trick)."""
    data = bytearray(path.read_bytes())
    local = data.find(b"PK\x03\x04")
    assert struct.unpack_from("<I", data, local + 22)[0] == real
    struct.pack_into("<I", data, local + 22, fake)
    central = data.find(b"PK\x01\x02")
    assert struct.unpack_from("<I", data, central + 24)[0] == real
    struct.pack_into("<I", data, central + 24, fake)
    path.write_bytes(bytes(data))


def test_lying_header_refused(tmp_path, out):
    z = make_zip(tmp_path / "liar.zip", [("ok/a.jpg", b"\0" * 50_000)])
    _understate_size(z, 50_000, 100)
    # The declared total (100) is under the cap; the real content (50 kB) is not.
    assert_refused(z, out, "liar.zip", "'ok/a.jpg'", cap=1_000)


def test_streaming_cap_counts_real_bytes(tmp_path):
    # Bypass the declared-size check to prove the byte counter alone stops extraction.
    z = make_zip(tmp_path / "s.zip", [("ok/a.jpg", b"\0" * 600), ("ok/b.jpg", b"\0" * 600)])
    root = tmp_path / "root"
    root.mkdir()
    with zipfile.ZipFile(z) as zf:
        members, _ = archive_mod._plan(zf, "s.zip", CAP)
        with pytest.raises(FerflowError, match=r"s\.zip: entry 'ok/b\.jpg' expands past the cap of 1,000"):
            archive_mod._extract(zf, members, root, "s.zip", 1_000)


def test_writer_counts_real_bytes():
    sink = io.BytesIO()

    def over() -> None:
        raise FerflowError("over")

    writer = archive_mod._CappedWriter(sink, 10, over)
    writer.write(b"12345")
    writer.write(b"67890")
    with pytest.raises(FerflowError):
        writer.write(b"1")


def test_encrypted_entry_refused(tmp_path, out):
    z = make_zip(tmp_path / "enc.zip", [("ok/a.jpg", b"1")])
    data = bytearray(z.read_bytes())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(sig) + flag_at
        struct.pack_into("<H", data, at, struct.unpack_from("<H", data, at)[0] | 0x1)
    z.write_bytes(bytes(data))
    assert_refused(z, out, "enc.zip", "'ok/a.jpg'", "encrypted")


def test_corrupt_member_cleans_up(tmp_path, out):
    z = make_zip(tmp_path / "crc.zip", [("ok/a.jpg", b"a" * 4000), ("ok/b.jpg", b"b" * 10)])
    data = bytearray(z.read_bytes())
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 16, 0xDEADBEEF)  # wrong CRC for the first entry
    z.write_bytes(bytes(data))
    assert_refused(z, out, "crc.zip", "'ok/a.jpg'", "corrupt")


def test_duplicate_entries_refused(tmp_path, out):
    with pytest.warns(UserWarning):
        z = make_zip(tmp_path / "dup.zip", [("ok/a.jpg", b"1"), ("ok/a.jpg", b"2")])
    assert_refused(z, out, "dup.zip", "'ok/a.jpg'", "more than once")


def test_existing_dest_replaced_only_on_success(tmp_path, out):
    dest = out / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    bad = make_zip(tmp_path / "bad.zip", [("ok/a.jpg", b"1"), ("../evil", b"x")])
    assert_refused(bad, out, "bad.zip")
    assert (dest / "old.txt").read_text() == "old"

    good = make_zip(tmp_path / "good.zip", [("ok/a.jpg", b"1")])
    res = safe_extract(good, dest, CAP)
    assert res.files == ["ok/a.jpg"]
    assert not (dest / "old.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["dest", "keep.txt"]


def test_creates_missing_parent(tmp_path):
    z = make_zip(tmp_path / "a.zip", [("x/positive/a.jpg", b"1")])
    res = safe_extract(z, tmp_path / "deep" / "er" / "dest", CAP)
    assert (res.root / "x/positive/a.jpg").is_file()
