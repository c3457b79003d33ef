"""The error gallery: which faces it picks, the PNG it draws, and where it ends up (evaluate's
folders, the training's MLflow run, the KFP evaluate task's Markdown)."""

import base64
import json
import re

import numpy as np
import pytest
from PIL import Image

from ferflow import stages
from ferflow.config import load_params
from ferflow.evaluation.evaluate import eval_datasets_for
from ferflow.evaluation.gallery import (
    CAPTION,
    GAP,
    HEADER,
    LABEL_W,
    ROW_GAP,
    TILE,
    canvas_size,
    most_confident_mistakes,
    write_error_gallery,
)
from ferflow.evaluation.metrics import write_evaluation
from ferflow.labels import CLASSES
from ferflow.pipeline.artifacts import EMBED_MAX_BYTES, gallery_markdown

from tracking.conftest import mlflow_isolation  # noqa: F401 - MLflow env/state reset after each test
from training.conftest import REPO, TRAIN_OVERRIDES, demo_workspace  # noqa: F401 - the prepared demo data

DS, MODEL = "LFW-FER", "demo_tiny"


def _probs(pred, conf, k=3):
    """Rows whose argmax is `pred` with probability `conf`, the rest spread evenly."""
    p = np.full((len(pred), k), 0.0)
    p[:] = ((1 - np.asarray(conf)) / (k - 1))[:, None]
    p[np.arange(len(pred)), pred] = conf
    return p


def _brute_force(y, probs, k, per_class):
    pred, conf = probs.argmax(1), probs.max(1)
    out = []
    for cls in range(k):
        wrong = [i for i in range(len(y)) if y[i] == cls and pred[i] != cls]
        out.append(sorted(wrong, key=lambda i: (-conf[i], i))[:per_class])
    return out


def test_selection_is_the_most_confident_mistakes_per_class():
    rng = np.random.default_rng(7)
    n, k = 300, 3
    y = rng.integers(0, k, n)
    y[y == 1] = 0  # class 1 absent from the truth: nothing to pick
    probs = rng.dirichlet(np.ones(k), n)
    probs[10] = probs[20] = [0.05, 0.05, 0.9]  # a tie: the lower index comes first
    y[10] = y[20] = 0
    for per_class in (1, 4, 8, 1000):
        got = most_confident_mistakes(y, probs, k, per_class)
        assert [list(g) for g in got] == _brute_force(y, probs, k, per_class)
    picks = list(most_confident_mistakes(y, probs, k, 8)[0])
    assert picks.index(10) < picks.index(20)
    assert len(most_confident_mistakes(y, probs, k, 8)[1]) == 0


def test_a_class_without_mistakes_gets_an_empty_row():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = _probs(np.array([0, 0, 1, 2, 2, 0]), np.array([0.9, 0.8, 0.7, 0.6, 0.99, 0.55]))
    got = most_confident_mistakes(y, probs, 3, 8)
    assert [list(g) for g in got] == [[], [3], [5]]


def _uniform_faces(n, size):
    """Image i is one flat colour unique to i, so a tile tells which image it shows."""
    colours = np.stack([np.arange(n) % 256, np.arange(n) // 256 * 40 % 256, 255 - np.arange(n) % 256], axis=1)
    return np.broadcast_to(colours[:, None, None, :], (n, size, size, 3)).astype(np.uint8), colours


def test_gallery_png_shows_exactly_the_chosen_faces(tmp_path):
    rng = np.random.default_rng(3)
    n, size, per_class = 120, 48, 5
    faces, colours = _uniform_faces(n, size)
    np.save(tmp_path / "faces.npy", faces)
    images = np.load(tmp_path / "faces.npy", mmap_mode="r")  # as evaluate passes them: a memmap
    y = rng.integers(0, 3, n)
    y[y == 1] = 2
    y[:3] = 1  # class 1: three images, all predicted right
    probs = rng.dirichlet(np.ones(3), n)
    probs[:3] = [0.1, 0.8, 0.1]
    paths = [f"LFW-FER/eval/{CLASSES[c]}/Some_Person_Name_{i:04d}.jpg" for i, c in enumerate(y)]
    out = tmp_path / "errors.png"

    chosen = write_error_gallery(out, images, y, probs, CLASSES, paths, per_class=per_class, title="m · d")
    assert [list(c) for c in chosen] == _brute_force(y, probs, 3, per_class)
    assert len(chosen[1]) == 0 and all(len(chosen[c]) == per_class for c in (0, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["errors.png", "faces.npy"]  # no temp file left
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == canvas_size(3, per_class)
        pixels = np.asarray(png.convert("RGB"))
    assert canvas_size(3, per_class) == (LABEL_W + per_class * (TILE + GAP), HEADER + 3 * (TILE + CAPTION + ROW_GAP))
    for row, picks in enumerate(chosen):
        top = HEADER + row * (TILE + CAPTION + ROW_GAP)
        for col, index in enumerate(picks):
            left = LABEL_W + col * (TILE + GAP)
            tile = pixels[top:top + TILE, left:left + TILE].reshape(-1, 3)
            assert (tile == colours[index]).all(), (row, col, index)
        if not len(picks):  # the empty row draws no tile: where one would be is background
            assert (pixels[top:top + TILE, LABEL_W + 2 * (TILE + GAP):][:, :TILE] == 255).all()
    assert out.stat().st_size < 200_000


def test_gallery_refuses_bad_input(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    y = np.array([0, 1, 2, 0])
    probs = _probs(np.array([1, 1, 2, 0]), np.full(4, 0.9))
    with pytest.raises(ValueError, match="probs must have shape"):
        write_error_gallery(tmp_path / "e.png", images, y, probs[:, :2], CLASSES)
    with pytest.raises(ValueError, match="3 images for 4 labels"):
        write_error_gallery(tmp_path / "e.png", images[:3], y, probs, CLASSES)
    with pytest.raises(ValueError, match="paths has 1"):
        write_error_gallery(tmp_path / "e.png", images, y, probs, CLASSES, paths=["a.jpg"])
    with pytest.raises(ValueError, match="per_class"):
        write_error_gallery(tmp_path / "e.png", images, y, probs, CLASSES, per_class=0)
    assert not list(tmp_path.iterdir())


def _data_uris(markdown):
    return [base64.b64decode(m) for m in re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)]


def test_gallery_markdown_without_mlflow(tmp_path):
    cell = tmp_path / "evaluation/fine-tuned" / DS / MODEL
    summary = {DS: {"accuracy": 0.5, "macro_f1": 0.4, "n": 6}, "M-LFW-FER": {"accuracy": 0.3, "macro_f1": 0.2, "n": 6}}
    faces, _ = _uniform_faces(6, 16)
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = _probs(np.array([1, 0, 2, 1, 0, 2]), np.full(6, 0.8))
    for eval_ds in summary:
        write_evaluation(cell / eval_ds, y, probs.argmax(1), probs, CLASSES, {"model": MODEL})
        write_error_gallery(cell / eval_ds / "errors.png", faces, y, probs, CLASSES)
    params = load_params(REPO / "params.yaml", [f"evaluate.out_dir={tmp_path / 'evaluation'}",
                                                f"train.out_dir={tmp_path / 'models'}", "tracking.enabled=false"])
    md = gallery_markdown(params, DS, MODEL, summary)
    images = _data_uris(md)
    assert images == [(cell / DS / "confusion.png").read_bytes(), (cell / DS / "errors.png").read_bytes()]
    assert "accuracy 50.00 %" in md and f"fine-tuned/{DS}/{MODEL}/M-LFW-FER/errors.png" in md
    assert "Not logged to MLflow (tracking.enabled is false)" in md


def test_evaluate_writes_galleries_logged_to_mlflow_and_shown_in_kfp(demo_workspace, tmp_path, monkeypatch):
    """A tiny trained run: every eval dataset gets errors.png; the training's MLflow run holds
    both PNGs of each; the KFP Markdown inlines the in-domain pair and names that run."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FERFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)  # the default store: sqlite:///mlruns/mlflow.db under cwd
    params = load_params(demo_workspace, TRAIN_OVERRIDES + [
        "tracking.enabled=true", "tracking.experiment=gallery", "tracking.log_system_metrics=false",
        f"train.out_dir={tmp_path / 'models'}", f"evaluate.out_dir={tmp_path / 'evaluation'}",
        "train.full_stage.epochs=1", "train.max_steps_per_epoch=5",
    ])
    stages.train(params, DS, MODEL)
    summary = stages.evaluate(params, DS, MODEL)
    assert list(summary) == eval_datasets_for(params, DS)
    cell = tmp_path / "evaluation/fine-tuned" / DS / MODEL
    for eval_ds in summary:
        with Image.open(cell / eval_ds / "errors.png") as png:
            assert png.size == canvas_size(len(CLASSES), 8)

    ref = json.loads((tmp_path / "models" / DS / MODEL / "mlflow_run.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns/mlflow.db'}")
    for eval_ds in summary:
        logged = {a.path for a in client.list_artifacts(ref["run_id"], f"evaluation/{eval_ds}")}
        assert {f"evaluation/{eval_ds}/confusion.png", f"evaluation/{eval_ds}/errors.png"} <= logged, logged
    artifacts = tmp_path / "mlruns/artifacts" / ref["run_id"] / "artifacts" / "evaluation" / DS
    assert (artifacts / "errors.png").read_bytes() == (cell / DS / "errors.png").read_bytes()

    md = gallery_markdown(params, DS, MODEL, summary)
    assert _data_uris(md) == [(cell / DS / "confusion.png").read_bytes(), (cell / DS / "errors.png").read_bytes()]
    assert ref["run_id"] in md and f"`{DS}/{MODEL}`" in md and "experiment `gallery`" in md
    assert all(f"fine-tuned/{DS}/{MODEL}/{eval_ds}/errors.png" in md for eval_ds in summary)
    assert len(md) < 2 * EMBED_MAX_BYTES


def test_report_points_to_each_evaluations_gallery(tmp_path):
    from ferflow.evaluation.report import collect_results, render_markdown

    for stage, train, model, eval_ds in [("fine-tuned", DS, MODEL, DS), ("fine-tuned", DS, MODEL, "M-LFW-FER"),
                                         ("zero-shot", "none", MODEL, DS)]:
        cell = tmp_path / stage / train / model / eval_ds
        cell.mkdir(parents=True)
        (cell / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "macro_f1": 0.4, "n": 9}))
    df = collect_results(tmp_path)
    md = render_markdown(df)
    assert "## Error galleries" in md and "evaluate task's `gallery`" in md
    assert f"- `{DS}/{MODEL}`: `evaluation/fine-tuned/{DS}/{MODEL}/<eval dataset>/errors.png` for {DS}, M-LFW-FER" in md
    assert "Error galleries" not in render_markdown(df[df["stage"] == "zero-shot"])  # no fine-tuned run: no line
