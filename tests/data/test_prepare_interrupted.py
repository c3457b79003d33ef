"""`ferflow prepare` killed with SIGKILL (the OOM killer, a cancelled CI job): its decode
workers must not outlive it, and the next run must clean up what it left and succeed."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from PIL import Image

from ferflow.config import load_params
from ferflow.fileio import sha256_file

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("negative", "neutral", "positive")
PER_CLASS = 1000  # 6,000 images: the workers are still busy when the test kills prepare


def make_archive(path: Path) -> Path:
    """Many distinct images, cheaply: a few JPEGs, each copy made unique by bytes after its
    end marker (decoders stop at the marker; the content hash sees them)."""
    bases = []
    for seed in range(8):
        buf = io.BytesIO()
        pixels = np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        bases.append(buf.getvalue())
    n = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for split in ("train", "eval"):
            for label in CLASSES:
                for i in range(PER_CLASS):
                    n += 1
                    name = f"Set/{split}/{label}/{split}_{label}_{i}_0001.jpg"
                    zf.writestr(name, bases[n % 8] + n.to_bytes(4, "big"))
    return path


def write_params(tmp_path: Path, archive: Path) -> Path:
    tree = load_params(REPO / "params.yaml", [
        f"data.raw_dir={archive.parent}", f"data.prepared_dir={tmp_path / 'prepared'}",
        "prepare.image_sizes=[32]", "prepare.workers=2", "prepare.face_crop=none", "fetch.progress=false",
    ]).model_dump(mode="json")
    tree["data"]["archives"]["LFW-FER"] = {"uri": archive.as_uri(), "sha256": sha256_file(archive),
                                           "size": archive.stat().st_size}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_kill_9_leaves_no_workers_and_the_next_run_cleans_up(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    archive = make_archive(raw / "LFW-FER.zip")
    cmd = [sys.executable, "-m", "ferflow.cli", "prepare", "--dataset", "LFW-FER",
           "--params", str(write_params(tmp_path, archive))]
    prepared = tmp_path / "prepared"

    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[psutil.Process] = []
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and len(workers) < 2:  # prepare.workers=2
            try:
                workers = parent.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)
        assert proc.poll() is None and len(workers) >= 2, "prepare ended before its workers could be seen"
        time.sleep(0.5)  # let the workers settle into decoding
        assert proc.poll() is None, "prepare finished before it could be killed; make the archive bigger"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert list(prepared.glob(".LFW-FER.tmp-*")), "the killed run had not started its output"

        deadline = time.monotonic() + 5
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [w.pid for w in workers if alive(w)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in workers:  # never leak processes from this test, pass or fail
            if alive(w):
                w.kill()
    assert survivors == [], f"decode workers {survivors} outlived the killed prepare"

    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(p.name for p in prepared.iterdir()) == ["LFW-FER"], "leftovers of the killed run remain"
    manifest = pd.read_parquet(prepared / "LFW-FER" / "manifest.parquet")
    assert len(manifest) == 2 * len(CLASSES) * PER_CLASS
