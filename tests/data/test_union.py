"""Union datasets: several archives prepared as one, splits remade by identity over the union."""

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ferflow import stages
from ferflow.config import Params, load_params
from ferflow.data.cache import CachedSplit
from ferflow.data.scratch import host_tag
from ferflow.fileio import sha256_file
from ferflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MEMBERS = ["LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    ws = tmp_path_factory.mktemp("union-ws")
    base = load_params(REPO / "params.yaml", [
        f"demo.out_dir={ws / 'archives'}", "demo.images_per_class=30", "demo.image_size=48",
        f"data.raw_dir={ws / 'raw'}", f"data.prepared_dir={ws / 'prepared'}", "prepare.image_sizes=[24]",
        "prepare.workers=1", "fetch.progress=false", "demo.overrides=[]",
    ])
    params_file = ws / "params.yaml"
    stages.demo_data(base, params_out=params_file)
    params = load_params(params_file)
    stages.fetch(params)
    return params


def read(folder: Path):
    return pd.read_parquet(folder / "manifest.parquet"), json.loads((folder / "report.json").read_text())


def test_union_gathers_members_and_keeps_people_in_one_split(demo):
    stages.prepare(demo, MEMBERS)
    (result,) = stages.prepare(demo, ["LFW-emotion-all"])
    manifest, report = read(result.out_dir)
    members = {m: read(demo.data.prepared_dir / m)[0] for m in MEMBERS}
    assert len(manifest) == sum(len(m) for m in members.values()) == result.n_images
    assert set(manifest["member"]) == set(MEMBERS)
    # Eval stays each archive's eval, image for image.
    for name, rows in members.items():
        expected = set(name + "/" + rows.loc[rows["split"] == "eval", "path"])
        assert set(manifest.loc[(manifest["member"] == name) & (manifest["split"] == "eval"), "path"]) == expected
    # A person's bare, masked and face-cut photos share one split.
    assert (manifest.groupby("identity")["split"].nunique() == 1).all()
    assert report["identities_in_several_splits"] == [] and report["dropped_identity_in_eval"]["images"] == 0
    assert set(manifest["split"]) == {"train", "val", "eval"}
    # The caches hold each member's cached image at the union's row.
    for split in ("train", "eval"):
        cache = CachedSplit(result.out_dir, split, 24)
        rows = manifest[manifest["split"] == split].sort_values("cache_index").head(5)
        for row in rows.itertuples():
            source_rows = members[row.member]
            src = source_rows[source_rows["path"] == row.path.split("/", 1)[1]].iloc[0]
            source = CachedSplit(demo.data.prepared_dir / row.member, src.split, 24)
            assert np.array_equal(cache.images[row.cache_index], source.images[src.cache_index])
            assert cache.labels[row.cache_index] == row.label_id
    assert report["members"]["LFW-FER"]["sha256"] == demo.data.archive("LFW-FER").sha256


def test_members_prepared_otherwise_are_prepared_afresh_and_left_alone(demo, tmp_path):
    tree = demo.model_dump(mode="json")
    tree["data"]["prepared_dir"] = str(tmp_path / "prepared")
    tree["prepare"]["image_sizes"] = [16]
    other = Params.model_validate(tree)
    stages.prepare(other, ["LFW-FER"])  # one member at 16 px only
    tree["prepare"]["image_sizes"] = [20]
    wanted = Params.model_validate(tree)
    before = sorted(p.name for p in (tmp_path / "prepared" / "LFW-FER" / "cache").iterdir())
    (result,) = stages.prepare(wanted, ["LFW-emotion-all"])
    assert CachedSplit(result.out_dir, "train", 20).images.shape[1] == 20
    assert sorted(p.name for p in (tmp_path / "prepared" / "LFW-FER" / "cache").iterdir()) == before == ["16"]
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["LFW-FER", "LFW-emotion-all"]


def _archive(path: Path, entries: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for i, (name, split) in enumerate(sorted(entries.items())):
            label = ("negative", "neutral", "positive")[int(name[1:].split("_")[0]) % 3]  # a person keeps a label
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), i * 7 % 255, dtype=np.uint8)).save(buf, format="PNG")
            zf.writestr(f"{split}/{label}/{name}", buf.getvalue())


def test_a_person_in_any_eval_split_leaves_the_union_training_pool(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    people = [f"P{i}_0001.png" for i in range(36)]
    a = {p: ("eval" if i < 9 else "train") for i, p in enumerate(people)}
    # P0..P8 are eval in A but train in B; P9..P11 eval in B but train in A.
    b = {p: ("eval" if 9 <= i < 12 else "train") for i, p in enumerate(people)}
    _archive(raw / "A.zip", a)
    _archive(raw / "B.zip", b)
    archives = {n: {"uri": str(raw / f"{n}.zip"), "sha256": sha256_file(raw / f"{n}.zip")} for n in ("A", "B")}
    params = load_params(REPO / "params.yaml", [
        f"data.archives={json.dumps(archives)}", 'data.unions={"AB": ["A", "B"]}', "train.datasets=[AB]",
        f"data.raw_dir={raw}", f"data.prepared_dir={tmp_path / 'prepared'}", "prepare.image_sizes=[8]",
        "prepare.workers=1", "prepare.split.val_fraction=0.2",
    ])
    (result,) = stages.prepare(params, ["AB"])
    manifest, report = read(result.out_dir)
    assert report["dropped_identity_in_eval"] == {"images": 12, "identities": 12}
    eval_people = set(manifest.loc[manifest["split"] == "eval", "identity"])
    assert not eval_people & set(manifest.loc[manifest["split"] != "eval", "identity"])
    assert eval_people == {f"P{i}" for i in range(12)}


@pytest.mark.parametrize("unions, message", [
    ('{"X": ["LFW-FER"]}', "two or more"),
    ('{"X": ["LFW-FER", "nope"]}', "two or more"),
    ('{"LFW-FER": ["M-LFW-FER", "M-LFW-FER-face-cut"]}', "already an archive"),
    ('{"bad name": ["LFW-FER", "M-LFW-FER"]}', "dataset name"),
])
def test_bad_unions_are_refused(unions, message):
    with pytest.raises(ConfigError, match=message):
        load_params(REPO / "params.yaml", [f"data.unions={unions}"])


def test_unknown_dataset_names_the_known_ones(demo):
    with pytest.raises(ConfigError, match="LFW-emotion-all"):
        stages.prepare(demo, ["nope"])


def test_union_sweeps_the_leftovers_of_a_killed_union(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    people = [f"P{i}_0001.png" for i in range(12)]
    for name in ("A", "B"):
        _archive(raw / f"{name}.zip", {p: ("eval" if i < 3 else "train") for i, p in enumerate(people)})
    archives = {n: {"uri": str(raw / f"{n}.zip"), "sha256": sha256_file(raw / f"{n}.zip")} for n in ("A", "B")}
    params = load_params(REPO / "params.yaml", [
        f"data.archives={json.dumps(archives)}", 'data.unions={"AB": ["A", "B"]}', "train.datasets=[AB]",
        f"data.raw_dir={raw}", f"data.prepared_dir={tmp_path / 'prepared'}", "prepare.image_sizes=[8]",
        "prepare.workers=1", "prepare.split.val_fraction=0.2", "prepare.allow_duplicates_across_splits=true",
    ])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for kind in ("members", "tmp"):  # what a union killed with SIGKILL leaves
        (tmp_path / "prepared" / f".AB.{kind}-{host_tag()}-{dead.pid}-abc12345" / "x").mkdir(parents=True)
    stages.prepare(params, ["AB"])
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["AB"]
