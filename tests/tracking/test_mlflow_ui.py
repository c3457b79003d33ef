"""The MLflow UI in a real browser: headless Chromium renders the registered model page of
a model promoted by ferflow (alias `champion`) from a real `mlflow server`.

Needs Debian's chromium (`scripts/install-system-deps.sh`, as CI runs it). Chromium only
ever talks to the loopback server: background networking is off and every other host name
resolves to nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ferflow.tracking import aliases, versioning
from tracking.test_registry import DATASET, REPO, tracking, trained, variant  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
SHOT_COPY = REPO / "benchmarks" / "out" / "mlflow-ui-champion.png"
# FACTS.md "Platform notes": the flags that render the MLflow UI here. The resolver rule
# is belt and braces: no host but the loopback server can be reached.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--virtual-time-budget=15000",  # lets the single-page app fetch and render before capture
]


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Session-scoped so that a missing browser fails before any model is trained."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium as root with "
                    "`apt-get install -y chromium` (or run scripts/install-system-deps.sh)", pytrace=False)
    return CHROMIUM


def run_chromium(binary: Path, tmp: Path, url: str, *mode: str, timeout: float = 120.0) -> str:
    """One headless Chromium run with a fresh profile; returns stdout (the DOM for --dump-dom)."""
    profile = Path(tmp) / f"profile-{len(list(Path(tmp).glob('profile-*')))}"
    profile.mkdir(parents=True)
    # HOME too: Chromium writes ~/.pki and caches outside --user-data-dir.
    env = {**os.environ, "HOME": str(profile)}
    proc = subprocess.Popen(
        [str(binary), *FLAGS, f"--user-data-dir={profile}", *mode, url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # a hung browser's renderer/GPU children die with it
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"chromium {' '.join(mode)} {url} hung for {timeout}s; stderr:\n{err[-3000:]}")
    assert proc.returncode == 0, f"chromium {' '.join(mode)} exited {proc.returncode}; stderr:\n{err[-3000:]}"
    return out


def visible_text(dom: str) -> str:
    """The DOM without scripts, styles and tags: what the page says."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


def test_model_page_shows_champion(chromium, trained, tracking, tmp_path):
    params, run_dir = variant(trained, tracking.uri, tmp_path / "v1", None, None,
                              "registry.first_champion_min=0")  # the tiny model is near chance
    name = params.registry.name_for(DATASET)
    version = versioning.register(params, DATASET, run_dir)
    decision = aliases.promote(params, name)
    assert decision.action == "promoted", decision
    champion = MlflowClient().get_model_version_by_alias(name, "champion")
    assert str(champion.version) == str(version.version)

    url = f"http://127.0.0.1:{tracking.port}/#/models/{name}"
    shot = tmp_path / "model.png"
    run_chromium(chromium, tmp_path, url, f"--screenshot={shot}", "--window-size=1400,900")
    dom = run_chromium(chromium, tmp_path, url, "--dump-dom")
    (tmp_path / "model.html").write_text(dom)  # kept beside the screenshot for a failing run

    # Precise places, not substrings anywhere: tag values and tmp paths hold these words too.
    text = visible_text(dom)
    title = re.search(r"<h2\b[^>]*>(.*?)</h2>", dom, flags=re.S)
    assert title and visible_text(title.group(1)) == name, f"model name not the page title; page text: {text[:2000]}"
    link = f'href="#/models/{name}/versions/{version.version}">Version {version.version}</a>'
    rows = [row for row in dom.split('role="row"') if link in row]
    assert rows, f"version {version.version} not listed; page text: {text[:2000]}"
    # The alias tag renders as "@ champion" in the aliases cell of that version's row.
    assert re.search(r">@(?:&nbsp;|\s)champion<", rows[0]), f"alias champion not on version {version.version}'s row"

    assert shot.is_file(), "chromium wrote no screenshot"
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, f"screenshot looks empty ({len(data)} bytes)"
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1400, 900)
    # For a person to look at (git-ignored).
    SHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SHOT_COPY)
