"""The stand-in archives (../shared) through the normal fetch + prepare path, by file URIs.

They are never copied into the repo; where they are absent this test is skipped (and says so).
"""

import json
import os
from pathlib import Path

import pytest

from ferflow import stages
from ferflow.config import load_params
from ferflow.data.sources import archives_from_checksums

REPO = Path(__file__).resolve().parents[2]
STANDIN = Path(os.environ.get("FERFLOW_STANDIN", REPO.parent / "shared" / "datasets" / "lfw-emotion-standin"))

# From the stand-in README: train and eval counts per class.
README_COUNTS = {
    "train": {"positive": 2346, "negative": 4266, "neutral": 1614},
    "eval": {"positive": 605, "negative": 1133, "neutral": 380},
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (STANDIN / "SHA256SUMS").is_file(), reason=f"stand-in archives not at {STANDIN}"),
]


def test_standin_archives_fetch_and_prepare(tmp_path):
    archives = archives_from_checksums(STANDIN / "SHA256SUMS")
    assert list(archives) == ["LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut"]
    overrides = [f"data.archives={json.dumps(archives)}",
        f"data.raw_dir={tmp_path / 'raw'}", f"data.prepared_dir={tmp_path / 'prepared'}",
        "prepare.image_sizes=[48]", "fetch.progress=false",
    ]
    params = load_params(REPO / "params.yaml", overrides)
    fetched = stages.fetch(params)
    assert all(r.downloaded for r in fetched)
    assert not any(r.downloaded for r in stages.fetch(params))  # second fetch reuses
    for result in stages.prepare(params):
        report = json.loads((result.out_dir / "report.json").read_text())
        assert report["quarantined"] == [], result.dataset
        counts = report["counts"]
        for label, n in README_COUNTS["train"].items():
            assert counts["train"][label] + counts["val"][label] == n
        assert counts["eval"] == {k: README_COUNTS["eval"][k] for k in counts["eval"]}
        assert report["duplicates_across_splits"] == []
        skipped = {s["path"].rsplit("/", 1)[-1] for s in report["skipped"]}
        if result.dataset == "M-LFW-FER":
            assert {".DS_Store", "._M-LFW-FER"} <= skipped
        else:
            assert skipped == set()
