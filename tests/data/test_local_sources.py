"""A user's own photos: a local folder (or zip) as data.archives.NAME.uri, without sha256 or size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import unicodedata
import zipfile
from pathlib import Path

import pytest
import yaml

from ferflow import stages
from ferflow.config import DemoSettings, load_params, read_yaml
from ferflow.data import digests, packing
from ferflow.data.demo import generate_demo_archives
from ferflow.data.dvc_remote import holding_pins
from ferflow.errors import ConfigError, FerflowError
from ferflow.fileio import sha256_file

REPO = Path(__file__).resolve().parents[2]
NAME = "MyFaces"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo LFW-FER zip at a tiny size (24 images, train and eval splits)."""
    out = tmp_path_factory.mktemp("demo")
    generate_demo_archives(DemoSettings(images_per_class=8, image_size=32, seed=3), out)
    return out / "LFW-FER.zip"


@pytest.fixture
def faces(tmp_path, demo) -> Path:
    """The demo archive as a user's folder: LFW-FER/{train,eval}/<class>/<person>_0001.jpg."""
    folder = tmp_path / "faces"
    with zipfile.ZipFile(demo) as zf:
        zf.extractall(folder)
    return folder


def write_params(tmp_path: Path, source: dict, **extra) -> Path:
    tree = {
        "data": {"raw_dir": str(tmp_path / "raw"), "prepared_dir": str(tmp_path / "prepared"),
                 "archives": {NAME: source}},
        "fetch": {"progress": False},
        "prepare": {"image_sizes": [16], "workers": 1, "split": {"val_fraction": 0}},
        **extra,
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def params_for(tmp_path: Path, source: dict):
    return load_params(write_params(tmp_path, source))


def digest_of(folder: Path, dest: Path) -> str:
    packing.pack_folder(folder, dest)
    return sha256_file(dest)


# ---------------------------------------------------------------------------- a folder as uri


def test_folder_uri_is_fetched_as_a_zip_and_prepared(tmp_path, faces):
    params = params_for(tmp_path, {"uri": str(faces)})
    [fetched] = stages.fetch(params)
    raw_zip = tmp_path / "raw" / f"{NAME}.zip"
    assert fetched.path == raw_zip and fetched.sha256 == sha256_file(raw_zip)
    with zipfile.ZipFile(raw_zip) as zf:
        names = zf.namelist()
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    assert names == sorted(p.relative_to(faces).as_posix() for p in faces.rglob("*") if p.is_file())
    [prepared] = stages.prepare(params)
    assert prepared.n_images == 24
    report = json.loads((tmp_path / "prepared" / NAME / "report.json").read_text())
    assert report["archive"]["sha256"] == fetched.sha256
    assert stages.with_digests(params, [NAME]).data.content_sha256(NAME) == fetched.sha256


def test_the_folder_digest_depends_on_the_content_alone(tmp_path, faces):
    first = digest_of(faces, tmp_path / "a.zip")
    assert digest_of(faces, tmp_path / "b.zip") == first
    copy = tmp_path / "elsewhere" / "other-name"
    shutil.copytree(faces, copy)
    for i, path in enumerate(sorted(copy.rglob("*"))):
        if path.is_file():
            path.chmod(0o600)
        os.utime(path, (1_000_000_000 + i, 1_000_000_000 + i))  # other times, in another order
    (copy / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # OS junk and hidden files are skipped
    (copy / "LFW-FER" / "Thumbs.db").write_bytes(b"thumbs")
    (copy / "__MACOSX").mkdir()
    (copy / "__MACOSX" / "._x.jpg").write_bytes(b"fork")
    (copy / ".cache").mkdir()
    (copy / ".cache" / "a.jpg").write_bytes(b"hidden")
    (copy / "empty-folder").mkdir()
    assert digest_of(copy, tmp_path / "c.zip") == first
    some_jpg = sorted(copy.glob("LFW-FER/**/*.jpg"))[0]
    some_jpg.write_bytes(some_jpg.read_bytes() + b"\0")
    assert digest_of(copy, tmp_path / "d.zip") != first


def test_names_are_unicode_normalised(tmp_path):
    for form in ("NFC", "NFD"):
        (tmp_path / form / "eval" / "positive").mkdir(parents=True)
        (tmp_path / form / "eval" / "positive" / unicodedata.normalize(form, "Renée_0001.jpg")).write_bytes(b"x")
    assert digest_of(tmp_path / "NFC", tmp_path / "a.zip") == digest_of(tmp_path / "NFD", tmp_path / "b.zip")


def test_symlinks_inside_are_followed_and_others_refused(tmp_path):
    folder = tmp_path / "faces"
    (folder / "eval" / "neutral").mkdir(parents=True)
    (folder / "eval" / "neutral" / "a.jpg").write_bytes(b"a")
    (folder / "eval" / "neutral" / "b.jpg").symlink_to("a.jpg")
    assert [n for n, _ in packing.folder_files(folder)] == ["eval/neutral/a.jpg", "eval/neutral/b.jpg"]

    (tmp_path / "secret.txt").write_text("not yours")
    (folder / "eval" / "neutral" / "c.jpg").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(FerflowError, match=r"symbolic link to .*secret.txt, outside the folder"):
        packing.folder_files(folder)
    (folder / "eval" / "neutral" / "c.jpg").unlink()
    (folder / "eval" / "loop").symlink_to(folder / "eval")
    with pytest.raises(FerflowError, match="a loop"):
        packing.folder_files(folder)


def test_an_empty_folder_and_a_missing_source_are_clear_errors(tmp_path):
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    with pytest.raises(FerflowError, match="holds no files"):
        stages.fetch(params_for(tmp_path, {"uri": str(tmp_path / "empty")}))
    with pytest.raises(FerflowError, match="source archive not found.*expected a zip or a folder"):
        stages.fetch(params_for(tmp_path, {"uri": str(tmp_path / "nowhere")}))


# ---------------------------------------------------------------------------- no sha256: recorded


def _change(source: Path) -> None:
    if source.is_dir():
        (source / "LFW-FER" / "eval" / "neutral" / "New_Person_0001.jpg").write_bytes(b"new")
    else:
        with zipfile.ZipFile(source, "a") as zf:
            zf.writestr("LFW-FER/eval/neutral/New_Person_0001.jpg", b"new")


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_no_sha256_records_the_digest_and_holds_later_fetches_to_it(tmp_path, faces, demo, kind):
    source = faces if kind == "folder" else Path(shutil.copy(demo, tmp_path / "mine.zip"))
    params = params_for(tmp_path, {"uri": source.as_uri() if kind == "zip" else str(source)})
    record = tmp_path / "raw" / f"{NAME}.sha256.json"
    [first] = stages.fetch(params)
    assert first.record == record and first.downloaded
    assert json.loads(record.read_text())["sha256"] == first.sha256 == sha256_file(first.path)
    [again] = stages.fetch(params)
    assert (again.sha256, again.downloaded) == (first.sha256, False)

    kept = source.read_bytes() if kind == "zip" else None
    _change(source)
    with pytest.raises(FerflowError) as info:
        stages.fetch(params)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{NAME}: ")
    assert f"recorded sha256 {first.sha256}" in message and str(record) in message
    new = message.split(", now ")[1].split(".")[0]
    assert len(new) == 64 and new != first.sha256
    assert f"data.archives.{NAME}.sha256={new}" in message
    assert sha256_file(first.path) == first.sha256  # the fetched zip is left as it was
    assert not list((tmp_path / "raw").glob("*.part"))

    if kind == "zip":
        source.write_bytes(kept)
    else:
        (source / "LFW-FER" / "eval" / "neutral" / "New_Person_0001.jpg").unlink()
    assert stages.fetch(params)[0].sha256 == first.sha256  # unchanged again: passes

    _change(source)
    record.unlink()  # accepting the change, as the error says
    [accepted] = stages.fetch(params)
    assert accepted.sha256 == new == digests.recorded_sha256(tmp_path / "raw", NAME)


def test_fetch_prints_the_digest_and_a_change_is_one_line(tmp_path, faces):
    params_file = write_params(tmp_path, {"uri": str(faces)})

    def fetch():
        return subprocess.run([sys.executable, "-m", "ferflow.cli", "fetch", "--params", str(params_file)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    first = fetch()
    assert first.returncode == 0, first.stderr
    digest = digests.recorded_sha256(tmp_path / "raw", NAME)
    assert f"{NAME}: no sha256 in params; content sha256 {digest}, recorded in" in " ".join(first.stdout.split())
    _change(faces)
    changed = fetch()
    lines = [line for line in changed.stderr.splitlines() if line.strip()]
    assert changed.returncode == 1 and len(lines) == 1, changed.stderr
    assert f"recorded sha256 {digest}" in lines[0] and "To accept the new content" in lines[0]


def test_stages_before_the_first_fetch_say_to_fetch(tmp_path, faces):
    params = params_for(tmp_path, {"uri": str(faces)})
    with pytest.raises(ConfigError, match=rf"data.archives.{NAME}.sha256: .*run `ferflow fetch --dataset {NAME}` first"):
        stages.prepare(params)
    with pytest.raises(ConfigError, match=f"ferflow fetch --dataset {NAME}"):
        params.data.content_sha256(NAME)


def test_a_union_and_the_pipeline_defaults_get_the_recorded_digest(tmp_path, faces, demo):
    from ferflow.pipeline.spec import PipelineDefaults

    tree = read_yaml(REPO / "params.yaml")
    tree["data"] = {"raw_dir": str(tmp_path / "raw"), "prepared_dir": str(tmp_path / "prepared"),
                    "archives": {NAME: {"uri": str(faces)}, "Demo": {"uri": str(demo), "sha256": sha256_file(demo)}},
                    "unions": {"Both": [NAME, "Demo"]}}
    tree["train"]["datasets"] = [NAME]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=f"ferflow fetch --dataset {NAME}"):
        PipelineDefaults.from_checkout(tmp_path, params_file=params_file, dvc_lock=None, dvc_remote="")
    params = load_params(params_file)
    fetched = {r.name: r.sha256 for r in stages.fetch(params)}
    defaults = PipelineDefaults.from_checkout(tmp_path, params_file=params_file, dvc_lock=None, dvc_remote="")
    assert defaults.archives[NAME]["sha256"] == fetched[NAME]
    filled = stages.with_digests(params, ["Both"])
    assert filled.data.archive(NAME).sha256 == fetched[NAME] and filled.data.content_sha256("Both")


def test_dvc_lock_pins_do_not_hold_for_an_unpinned_source(tmp_path, faces):
    params = params_for(tmp_path, {"uri": str(faces)})
    lock = {"stages": {f"fetch@{NAME}": {"outs": [{"path": f"data/raw/{NAME}.zip", "md5": "0" * 32,
                                                     "hash": "md5"}]}}}
    assert holding_pins(params.data.specs, lock) == {}
    stages.fetch(params)
    assert set(holding_pins(stages.with_digests(params).data.specs, lock)) == {NAME}


# ---------------------------------------------------------------------------- local archives and size


def test_a_local_archive_needs_no_size_and_a_stale_size_is_not_checked(tmp_path, demo):
    digest = sha256_file(demo)
    params = params_for(tmp_path, {"uri": str(demo), "sha256": digest})
    assert stages.fetch(params)[0].sha256 == digest
    # A size left from the archive that --set uri replaced (the LFW-FER case).
    stale = load_params(write_params(tmp_path, {"uri": str(demo), "sha256": digest}),
                        [f"data.archives.{NAME}.size=165369418"])
    [again] = stages.fetch(stale)
    assert again.sha256 == digest and not again.downloaded
    assert stages.prepare(stale)[0].n_images == 24
    assert not (tmp_path / "raw" / f"{NAME}.sha256.json").exists()  # pinned in params: nothing recorded
