"""`ferflow predict` on files and folders (CSV, JSON, annotations, face-crop override, bad
input), model references, and the identity of the three inference paths: evaluate's
predictions.csv, the registered pyfunc and predict give the same probabilities."""

from __future__ import annotations

import base64
import io
import json
import shutil
import zipfile
from pathlib import Path

import matplotlib
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from ferflow import cli, stages
from ferflow.config import load_params
from ferflow.labels import CLASSES

from .conftest import MLFLOW_ENV

REPO = Path(__file__).resolve().parents[2]
DATASET, MODEL = "LFW-FER", "demo_tiny"
WHEEL = REPO / ".venv" / "assets" / "facenet_pytorch-2.6.0-py3-none-any.whl"
PORTRAIT = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
PROBS = [f"p_{c}" for c in CLASSES]

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Demo archives with 64 px images (so predict really resizes to the model's 48), the
    in-domain one prepared with face_crop none, one tiny model trained 1 + 1 epochs on CPU,
    evaluated on its eval split and registered as champion in a local sqlite MLflow store.
    Returns (workspace, params file for the CLI, params)."""
    root = tmp_path_factory.mktemp("predict-ws")
    with pytest.MonkeyPatch.context() as mp:
        for key in MLFLOW_ENV:
            mp.delenv(key, raising=False)
        mp.setenv("FERFLOW_CACHE", str(root / "cache"))
        base = load_params(REPO / "params.yaml", [
            f"demo.out_dir={root / 'archives'}", "demo.images_per_class=16", "demo.image_size=64", "demo.overrides=[]",
            f"data.raw_dir={root / 'data/raw'}", f"data.prepared_dir={root / 'data/prepared'}",
            "prepare.image_sizes=[48]", "prepare.face_crop=none", "prepare.workers=1", "fetch.progress=false",
        ])
        stages.demo_data(base, params_out=root / "demo-params.yaml")
        params = load_params(root / "demo-params.yaml", [
            f"train.out_dir={root / 'models'}", f"evaluate.out_dir={root / 'evaluation'}",
            f"report.out_dir={root / 'reports'}", f"registry.records_dir={root / 'registry'}",
            "train.models=[demo_tiny]", f"train.datasets=[{DATASET}]", "train.input_size=48", "train.batch_size=16",
            "train.head_stage.epochs=1", "train.full_stage.epochs=1", "train.workers=0", "train.threads=1",
            "train.early_stopping_patience=0", "train.device=cpu", "evaluate.batch_size=5",
            "registry.first_champion_min=0",  # the tiny model is near chance; it serves anyway here
            "tracking.enabled=false", f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            f"tracking.artifact_location={root / 'mlartifacts'}", f"tracking.experiment=predict-{root.name}",
            f"prepare.detector.weights={WHEEL}",
        ])
        params_file = root / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
        stages.fetch(params, [DATASET])
        stages.prepare(params, [DATASET])
        stages.train(params, DATASET, MODEL)
        stages.evaluate(params, DATASET, MODEL, [DATASET])
        from ferflow.tracking import aliases, service

        try:
            stages.register(params, DATASET, MODEL)
            assert aliases.promote(params, params.registry.name_for(DATASET)).action == "promoted"
        finally:
            service.reset()
    return root, params_file, params


def ferflow(capsys, *args) -> tuple[int, str, str]:
    """The CLI in-process, as the console script runs it: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_.value.code or 0, captured.out, captured.err


def predict(capsys, params_file, *args) -> tuple[int, str, str]:
    return ferflow(capsys, "predict", *args, "--params", params_file)


def eval_images(params) -> list[tuple[str, bytes]]:
    """(manifest path, encoded bytes prepare decoded) of the in-domain eval split, in cache order."""
    manifest = pd.read_parquet(params.data.prepared_dir / DATASET / "manifest.parquet")
    rows = manifest[manifest["split"] == "eval"].sort_values("cache_index")
    with zipfile.ZipFile(params.data.raw_dir / f"{DATASET}.zip") as zf:
        names = set(zf.namelist())
        return [(p, zf.read(p if p in names else next(n for n in names if n.endswith("/" + p))))
                for p in rows["path"]]


def write_images(folder: Path, images) -> Path:
    for path, data in images:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return folder


def run_dir(ws) -> Path:
    return ws[0] / "models" / DATASET / MODEL


# ---------------------------------------------------------------------------- predict


def test_folder_to_csv_json_and_annotations(ws, tmp_path, capsys):
    root, params_file, params = ws
    images = eval_images(params)
    photos = write_images(tmp_path / "photos", images)
    good = sorted(str(photos / p) for p, _ in images)
    corrupt = photos / "broken" / "truncated.jpg"
    corrupt.parent.mkdir()
    corrupt.write_bytes(images[0][1][: len(images[0][1]) // 2])
    (photos / "fake.png").write_text("not an image at all")
    (photos / "notes.txt").write_text("not an image and not named like one: ignored")

    code, out, err = predict(capsys, params_file, photos, "--model", run_dir(ws), "--batch-size", 4)
    assert code == 0, err
    table = pd.read_csv(io.StringIO(out))
    assert list(table.columns) == ["path", "label", *PROBS, "box_x0", "box_y0", "box_x1", "box_y1", "face"]
    assert table["path"].tolist() == good  # sorted, unreadable ones left out
    probs = table[PROBS].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-6)
    assert table["label"].tolist() == [CLASSES[i] for i in probs.argmax(1)]
    assert (table[["box_x0", "box_y0", "box_x1", "box_y1"]].to_numpy() == [0, 0, 64, 64]).all()
    assert set(table["face"]) == {"none"}
    assert f"{corrupt}:" in err and f"{photos / 'fake.png'}: cannot decode image" in err
    assert "notes.txt" not in err and f"{len(good)} image(s) predicted, 2 skipped" in err

    code, _, err = predict(capsys, params_file, photos, "--model", run_dir(ws), "--out", tmp_path / "out" / "p.json",
                           "--annotate", tmp_path / "annotated")
    assert code == 0, err
    doc = json.loads((tmp_path / "out" / "p.json").read_text())
    assert doc["classes"] == list(CLASSES) and doc["face_crop"] == "none" and doc["model_name"] == MODEL
    assert [r["path"] for r in doc["predictions"]] == good
    assert np.array_equal(pd.DataFrame(doc["predictions"])[PROBS].to_numpy(), probs)  # CSV is lossless
    assert sorted((s["path"], "decode" in s["reason"]) for s in doc["skipped"]) == [
        (str(corrupt), True), (str(photos / "fake.png"), True)]

    for path, data in images:  # same relative names, the box and label drawn on a copy
        copy = Image.open(tmp_path / "annotated" / path)
        original = Image.open(io.BytesIO(data)).convert("RGB")
        assert copy.size == original.size
        diff = np.abs(np.asarray(copy, dtype=int) - np.asarray(original, dtype=int)).max(2)
        assert (diff > 30).sum() > 64 and diff[24:40, 24:40].mean() < 10  # drawn on, the face kept
    assert not (tmp_path / "annotated" / "fake.png").exists()

    code, _, err = predict(capsys, params_file, photos, "--model", run_dir(ws), "--out", tmp_path / "p.csv")
    assert code == 0, err
    assert (tmp_path / "p.csv").read_text() == out


def test_face_crop_override_changes_the_box(ws, tmp_path, capsys):
    _, params_file, _ = ws
    if not WHEEL.is_file():
        pytest.fail(f"{WHEEL} is missing: `make install` (or `make assets`) downloads it from the package index")
    photo = tmp_path / "portrait.jpg"
    shutil.copy(PORTRAIT, photo)
    width, height = Image.open(photo).size
    rows = {}
    for spec in (None, "center:0.5", "detect"):
        args = ["--face-crop", spec] if spec else []
        code, out, err = predict(capsys, params_file, photo, "--model", run_dir(ws), *args)
        assert code == 0, err
        rows[spec] = pd.read_csv(io.StringIO(out)).iloc[0]
    box = lambda r: tuple(int(r[k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1"))  # noqa: E731
    assert rows[None]["face"] == "none" and box(rows[None]) == (0, 0, width, height)
    side = round(min(width, height) * 0.5)
    assert rows["center:0.5"]["face"] == "center"
    assert box(rows["center:0.5"]) == ((width - side) // 2, (height - side) // 2,
                                       (width - side) // 2 + side, (height - side) // 2 + side)
    # The detector (weights from the local wheel, prepare.detector.weights) finds her face.
    x0, y0, x1, y1 = box(rows["detect"])
    assert rows["detect"]["face"] == "detected" and 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert 150 < x1 - x0 < 450 and box(rows["detect"]) != box(rows["center:0.5"])
    assert not np.allclose(rows[None][PROBS].to_numpy(float), rows["detect"][PROBS].to_numpy(float), atol=1e-7)


@pytest.mark.parametrize("ref, says", [
    ("no_such_model", "names no model"),
    ("models:/missing@champion", "no registered model named 'missing'"),
    ("models:/ferflow-lfw-fer@nope", "has no alias 'nope'"),
    ("models:/ferflow-lfw-fer/99", "has no version 99"),
    ("models:/ferflow-lfw-fer", "expected models:/<name>@<alias>"),
    ("EMPTY_DIR", "not a training run directory"),
    ("demo_tiny", "cannot predict zero-shot"),
])
def test_bad_model_reference_exits_2_naming_it(ws, tmp_path, capsys, ref, says):
    _, params_file, _ = ws
    if ref == "EMPTY_DIR":
        ref = str(tmp_path / "not-a-run")
        Path(ref).mkdir()
        (Path(ref) / "best.safetensors").write_bytes(b"")  # weights alone are not a run
    photo = tmp_path / "a.jpg"
    shutil.copy(PORTRAIT, photo)
    code, out, err = predict(capsys, params_file, photo, "--model", ref)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and repr(ref) in lines[0] and says in lines[0], err
    assert out == ""


@pytest.mark.parametrize("args, says", [
    (["--out", "predictions.txt"], "expected a .csv or .json"),
    (["--face-crop", "eyes"], "--face-crop 'eyes'"),
    (["--face-crop", "center:1.5"], "--face-crop 'center:1.5'"),
    (["--batch-size", "0"], "--batch-size 0"),
])
def test_bad_options_exit_2(ws, tmp_path, capsys, args, says):
    _, params_file, _ = ws
    code, _, err = predict(capsys, params_file, PORTRAIT, "--model", run_dir(ws), *args)
    assert code == 2 and says in err, err
    code, _, err = predict(capsys, params_file, tmp_path / "missing.jpg", "--model", run_dir(ws))
    assert code == 2 and "missing.jpg: no such file or directory" in err, err


def test_nothing_readable_exits_1_and_lists_the_files(ws, tmp_path, capsys):
    _, params_file, _ = ws
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    code, _, err = predict(capsys, params_file, tmp_path / "in", "--model", run_dir(ws), "--out", tmp_path / "o.json")
    assert code == 1 and "none of the 1 image file(s) could be read" in err, err
    assert json.loads((tmp_path / "o.json").read_text())["skipped"][0]["path"] == str(tmp_path / "in" / "a.jpg")


# ---------------------------------------------------------------------------- identity


def test_evaluate_pyfunc_and_predict_give_the_same_probabilities(ws, tmp_path, capsys):
    """The same eval images through (a) `ferflow evaluate` (prepare's cache; predictions.csv,
    6 decimals), (b) the registered version's pyfunc on the encoded files, (c) `ferflow
    predict` on the same files from the registry: one preprocessing, one Predictor."""
    root, params_file, params = ws
    images = eval_images(params)
    assert len(images) >= 8
    evaluated = pd.read_csv(root / "evaluation" / "fine-tuned" / DATASET / MODEL / DATASET / "predictions.csv")
    assert evaluated["path"].tolist() == [p for p, _ in images]
    expected = evaluated[PROBS].to_numpy()

    photos = write_images(tmp_path / "photos", images)
    name = params.registry.name_for(DATASET)
    code, _, err = predict(capsys, params_file, photos, "--model", f"models:/{name}@champion", "--batch-size", 3,
                           "--out", tmp_path / "p.json")
    assert code == 0, err
    doc = json.loads((tmp_path / "p.json").read_text())
    by_path = {Path(r["path"]).relative_to(photos).as_posix(): r for r in doc["predictions"]}
    predicted = np.array([[by_path[p][c] for c in PROBS] for p, _ in images])
    assert doc["skipped"] == [] and all(by_path[p]["face"] == "none" for p, _ in images)
    assert all(by_path[p]["box_x1"] == 64 for p, _ in images)  # 64 px files, resized to the model's 48

    from ferflow.tracking import service

    service.configure(params)
    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    served = model.predict(pd.DataFrame({"image": [base64.b64encode(data).decode("ascii") for _, data in images]}))

    assert np.ptp(predicted, axis=0).max() > 1e-3  # the images differ: equal rows would prove nothing
    assert np.abs(served[PROBS].to_numpy() - predicted).max() <= 1e-6
    assert np.abs(expected - predicted).max() <= 1e-6 + 1e-12  # evaluate rounds to 6 decimals
    # Evaluate's own numbers before that rounding: prepare's cache through the same Predictor.
    from ferflow.data.cache import CachedSplit
    from ferflow.models.inference import load_run

    split = CachedSplit(params.data.prepared_dir / DATASET, "eval", 48)
    unrounded = load_run(run_dir(ws), torch.device("cpu")).probabilities_of_split(split, params.evaluate.batch_size)
    assert np.abs(unrounded - predicted).max() <= 1e-6
    assert served["label"].tolist() == [by_path[p]["label"] for p, _ in images] == evaluated["predicted"].tolist()
