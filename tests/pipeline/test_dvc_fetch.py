"""The fetch component in DVC mode: archives pinned by a real dvc.lock are downloaded from
the DVC S3 remote (moto server process, filled by a real `dvc push`) by md5, checked
against both the lock's md5 and the params' sha256; unpinned or unavailable ones come
from their params URI and are still held to the lock. `ferflow fetch` (the dvc.yaml stage)
is the same fetch: tested here through the CLI, with the lock of a real `dvc repro`."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from kfp import dsl

from ferflow.data import dvc_remote
from ferflow.data.dvc_remote import DvcPin
from ferflow.errors import FerflowError
from ferflow.pipeline.spec import PipelineDefaults, read_dvc_lock

from . import REPO

BIN = Path(sys.executable).parent
BUCKET = "ferflow-kfp-dvc"
REMOTE = f"s3://{BUCKET}/store"
NAMES = ("LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut")
pytestmark = pytest.mark.slow


def _run(cmd, cwd, env=None):
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    done = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, s3_server):
    """A DVC workspace with the repo's fetch stage (only) on demo archives, run and pushed."""
    ws = tmp_path_factory.mktemp("dvc-fetch")
    _run(["ferflow", "demo-data", "--out", "archives", "--params-out", "params.yaml", "--params",
          str(REPO / "params.yaml"), "--set", "demo.images_per_class=10", "--set", "demo.image_size=32"], ws)
    fetch_stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["fetch"]
    (ws / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"fetch": fetch_stage}}, sort_keys=False))
    shutil.copy(REPO / ".dvcignore", ws / ".dvcignore")
    _run(["dvc", "init", "--no-scm", "-q"], ws)
    _run(["dvc", "remote", "add", "-d", "storage", REMOTE], ws)
    _run(["dvc", "repro", *(f"fetch@{n}" for n in NAMES)], ws)
    s3_server.make_bucket(BUCKET)
    _run(["dvc", "push"], ws, env=s3_server.env())
    return ws


def _fetch(ws: Path, tmp: Path, lock, remote: str, uri_root: Path = None) -> tuple[dict, Path]:
    """Run the fetch component's function as KFP would; archive URIs under `uri_root`."""
    from components.fetch import fetch

    base = yaml.safe_load((ws / "params.yaml").read_text())
    for name, source in base["data"]["archives"].items():
        source["uri"] = str((uri_root or ws) / "archives" / f"{name}.zip")
    config, raw = dsl.Artifact(name="config", uri=str(tmp / "config")), dsl.Dataset(name="raw", uri=str(tmp / "raw"))
    defaults = dict(archives={}, datasets=[], models=[], matrix=None, overrides=[], experiment="",
                    registered_models={})
    fetch.python_func(base_params=json.dumps(base), dvc_lock=lock, dvc_remote=remote, config=config, raw=raw,
                      **defaults)
    return raw.metadata["archives"], Path(raw.path)


def _lock(ws: Path) -> dict:
    return read_dvc_lock(ws / "dvc.lock")


def test_pinned_archives_come_from_the_dvc_remote(pushed, s3_env, tmp_path):
    lock = _lock(pushed)
    assert set(lock["stages"]) == {f"fetch@{n}" for n in NAMES}  # only the fetch stages are embedded
    # Params URIs that lead nowhere: the archives can only have come from the remote.
    sources, raw = _fetch(pushed, tmp_path, lock, REMOTE, uri_root=tmp_path / "nowhere")
    assert {n: s["source"] for n, s in sources.items()} == {n: "dvc-remote" for n in NAMES}
    pins = dvc_remote.read_pins(lock)
    for name in NAMES:
        assert dvc_remote.md5_file(raw / f"{name}.zip") == pins[name].md5
        assert (raw / f"{name}.zip").read_bytes() == (pushed / "data/raw" / f"{name}.zip").read_bytes()


def test_a_lock_md5_that_the_archive_does_not_have_is_refused(pushed, s3_env, tmp_path):
    lock = _lock(pushed)
    real = lock["stages"]["fetch@LFW-FER"]["outs"][0]["md5"]
    forged = "0" * 32
    # The remote holds the right bytes under the forged md5: sha256 passes, md5 must not.
    client = s3_env.client()
    client.copy_object(Bucket=BUCKET, Key=f"store/files/md5/00/{forged[2:]}",
                       CopySource={"Bucket": BUCKET, "Key": f"store/files/md5/{real[:2]}/{real[2:]}"})
    lock["stages"]["fetch@LFW-FER"]["outs"][0]["md5"] = forged
    with pytest.raises(FerflowError, match=f"dvc.lock pins md5 {forged}"):
        _fetch(pushed, tmp_path, lock, REMOTE)


def test_unpinned_and_unavailable_archives_use_their_uri_and_stay_checked(pushed, s3_env, tmp_path):
    lock = _lock(pushed)
    del lock["stages"]["fetch@M-LFW-FER"]
    sources, _ = _fetch(pushed, tmp_path / "a", lock, REMOTE)
    assert sources["M-LFW-FER"]["source"] == "uri" and sources["LFW-FER"]["source"] == "dvc-remote"
    # A remote without the objects (not pushed there): params URIs, md5 still verified.
    sources, raw = _fetch(pushed, tmp_path / "b", _lock(pushed), f"s3://{BUCKET}/elsewhere")
    assert {s["source"] for s in sources.values()} == {"uri"}
    assert dvc_remote.md5_file(raw / "LFW-FER.zip") == dvc_remote.read_pins(_lock(pushed))["LFW-FER"].md5


def test_compile_defaults_pin_the_workspace_lock_and_remote(pushed):
    defaults = PipelineDefaults.from_checkout(pushed)
    assert defaults.dvc_remote == REMOTE
    assert defaults.dvc_lock == _lock(pushed) and defaults.datasets == list(NAMES)
    assert PipelineDefaults.from_checkout(pushed, dvc_lock=None).dvc_lock == {}


def test_object_addresses():
    md5 = "0123456789abcdef0123456789abcdef"
    assert dvc_remote.object_uri("s3://b/p/", DvcPin("x", md5, 1, legacy=False)) == \
        f"s3://b/p/files/md5/01/{md5[2:]}"
    assert dvc_remote.object_uri("s3://b/p", DvcPin("x", md5, 1, legacy=True)) == f"s3://b/p/01/{md5[2:]}"
    lock = {"stages": {"fetch@a": {"outs": [{"path": "data/raw/a.zip", "hash": "md5", "md5": md5}]},
                       "fetch@b": {"outs": [{"path": "data/raw/b.zip", "md5": md5}]},
                       "train@a-m": {"outs": [{"path": "models/a/m/best.safetensors", "md5": md5}]}}}
    pins = dvc_remote.read_pins(yaml.safe_dump(lock))
    assert set(pins) == {"a", "b"} and pins["b"].legacy and not pins["a"].legacy
    with pytest.raises(FerflowError, match="dvc_remote"):
        dvc_remote.object_uri("", pins["a"])


def _dvc_config(repo: Path, url: str) -> None:
    """A checkout's .dvc/config whose default remote `web` has this URL."""
    (repo / ".dvc").mkdir()
    (repo / ".dvc/config").write_text(f"[core]\n    remote = web\n['remote \"web\"']\n    url = {url}\n")


@pytest.mark.parametrize("url", [
    "https://user:hunter2@dvc.example/store",
    "https://dvc.example/store?token=hunter2",
    "https://dvc.example/store?X-Amz-Signature=hunter2&X-Amz-SignedHeaders=host",
])
def test_a_remote_url_with_credentials_is_not_embedded(tmp_path, url):
    """Whatever the redaction policy would mask is refused: userinfo and secret query values."""
    from ferflow.pipeline.spec import read_dvc_remote

    _dvc_config(tmp_path, url)
    with pytest.raises(FerflowError, match="credentials") as caught:
        read_dvc_remote(tmp_path)
    message = str(caught.value)
    assert "hunter2" not in message and ".dvc/config" in message and "'web'" in message


def test_a_remote_url_without_credentials_is_embedded(tmp_path):
    from ferflow.pipeline.spec import read_dvc_remote

    url = "https://dvc.example/store?versionId=3&X-Amz-SignedHeaders=host"  # names the policy keeps
    _dvc_config(tmp_path, url)
    assert read_dvc_remote(tmp_path) == url


# ---------------------------------------------------------------- the CLI's fetch: the same pins


def _copy(ws: Path, tmp: Path, uri_root: Path = None) -> Path:
    """A copy of the pushed workspace (lock, cache, params) with no fetched archives."""
    dest = tmp / "ws"
    shutil.copytree(ws, dest, ignore=shutil.ignore_patterns("raw"))
    if uri_root is not None:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        for name, source in params["data"]["archives"].items():
            source["uri"] = str(uri_root / f"{name}.zip")
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def _cli(cwd: Path, *args, env=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    return subprocess.run(["ferflow", "fetch", *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=300)


def test_the_cli_fetches_pinned_archives_from_the_remote_like_the_task(pushed, s3_server, tmp_path):
    ws = _copy(pushed, tmp_path, uri_root=tmp_path / "nowhere")
    done = _cli(ws, "--dvc-remote", REMOTE, env=s3_server.env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("DVC remote") == len(NAMES)
    for name in NAMES:
        assert (ws / "data/raw" / f"{name}.zip").read_bytes() == (pushed / "data/raw" / f"{name}.zip").read_bytes()


def test_the_cli_holds_archives_to_the_lock(pushed, tmp_path):
    ws = _copy(pushed, tmp_path)
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    lock["stages"]["fetch@LFW-FER"]["outs"][0]["md5"] = "0" * 32
    (ws / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    done = _cli(ws, "--dataset", "LFW-FER")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"dvc.lock pins md5 {'0' * 32}" in done.stderr
    # Another lock file, or none, is the caller's choice.
    assert _cli(ws, "--dataset", "LFW-FER", "--dvc-lock", str(tmp_path / "none.lock")).returncode == 0


def test_a_pin_recorded_for_other_params_is_stale_not_an_error(pushed, tmp_path):
    """`dvc repro` after a params change runs the fetch stage with the old lock entry: the
    stale pin is set aside, and DVC records the new one."""
    ws = _copy(pushed, tmp_path)
    archive = ws / "archives" / "LFW-FER.zip"
    with zipfile.ZipFile(archive, "a") as zf:  # new content, so a new sha256
        zf.comment = b"relabelled"
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["data"]["archives"]["LFW-FER"].update(sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
                                                size=archive.stat().st_size)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    old = dvc_remote.read_pins(ws / "dvc.lock")["LFW-FER"]
    # The compiled pipeline leaves the stale pin out, and says so.
    assert set(PipelineDefaults.from_checkout(ws).dvc_lock["stages"]) == {f"fetch@{n}" for n in NAMES[1:]}
    _run(["dvc", "repro", "fetch@LFW-FER"], ws)
    new = dvc_remote.read_pins(ws / "dvc.lock")["LFW-FER"]
    assert new.md5 == dvc_remote.md5_file(ws / "data/raw/LFW-FER.zip") != old.md5
    assert new.sha256 == params["data"]["archives"]["LFW-FER"]["sha256"]
    assert _cli(ws, "--dataset", "LFW-FER").returncode == 0


def test_the_embedded_lock_holds_hashes_only(pushed, tmp_path):
    """DVC records the stage's params, archive URIs included, in dvc.lock: none of that may
    reach the compiled pipeline (a URI may carry a token)."""
    ws = _copy(pushed, tmp_path)
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    for entry in lock["stages"].values():
        for archive in entry["params"]["params.yaml"]["data.archives"].values():
            archive["uri"] = "https://host/x.zip?token=hunter2"
    (ws / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    embedded = PipelineDefaults.from_checkout(ws).dvc_lock
    assert "hunter2" not in json.dumps(embedded) and "uri" not in json.dumps(embedded)
    assert dvc_remote.read_pins(embedded) == dvc_remote.read_pins(lock)
