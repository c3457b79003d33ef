import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from ferflow.labels import CLASSES
from ferflow.errors import FerflowError
from ferflow.evaluation.metrics import (
    compute_metrics,
    plot_confusion,
    write_evaluation,
)
from ferflow.labels import collapse_probs
from ferflow.layout import EVALUATION_FILES
from ferflow.labels import source_mapping as zero_shot_mapping

SEVEN = ["Anger", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]
EIGHT = ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]
NEG, NEU, POS = 0, 1, 2


# ------------------------------------------------------------------------------ metrics


def test_metrics_hand_computed():
    # true:  neg neg neg neu neu pos ; pred: neg neg neu neu pos pos
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    m = compute_metrics(y_true, y_pred, CLASSES)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["n"] == 6
    # neg P=1 R=2/3 F=0.8; neu P=1/2 R=1/2 F=1/2; pos P=1/2 R=1 F=2/3
    assert m["per_class"]["negative"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["neutral"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["positive"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    # rows = true, cols = predicted
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_class_absent_from_predictions_and_truth():
    # positive is never predicted; neutral never occurs in y_true
    y_true = np.array([0, 0, 2, 2])
    y_pred = np.array([0, 1, 0, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero_division must silence UndefinedMetricWarning
        m = compute_metrics(y_true, y_pred, CLASSES)
    assert m["per_class"]["positive"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["per_class"]["neutral"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # negative: 1 of 3 predictions right (P=1/3), 1 of 2 found (R=1/2) -> F1=0.4
    assert m["per_class"]["negative"]["f1"] == pytest.approx(0.4)
    assert m["macro_f1"] == pytest.approx(0.4 / 3)  # all three classes count
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 0.0) / 2)  # only classes present in truth
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 0, 0], [2, 0, 0]]


def test_metrics_validation():
    with pytest.raises(FerflowError, match="empty"):
        compute_metrics(np.array([], dtype=int), np.array([], dtype=int), CLASSES)
    with pytest.raises(ValueError, match="0..2"):
        compute_metrics(np.array([0, 3]), np.array([0, 1]), CLASSES)
    with pytest.raises(ValueError, match="labels"):
        compute_metrics(np.array([0, 1]), np.array([0]), CLASSES)
    with pytest.raises(ValueError, match="integer"):
        compute_metrics(np.array([0.0, 1.0]), np.array([0, 1]), CLASSES)


# ------------------------------------------------------------------------------- files


def test_plot_confusion_png(tmp_path):
    path = tmp_path / "cm.png"
    plot_confusion([[5, 1, 0], [0, 0, 0], [2, 3, 4]], CLASSES, "t", path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]


def test_write_evaluation_files(tmp_path):
    out = tmp_path / "eval" / "run"
    y_true = np.array([0, 0, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 0])
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.5, 0.1, 0.4]])
    meta = {"model": "enet_b0_7", "train_dataset": "LFW-FER", "eval_dataset": "LFW-FER", "split": "eval",
            "stage": "fine-tuned", "epochs": np.int64(3), "tags": ["not", "scalar"]}
    paths = [f"eval/{c}/P_{i:04d}.jpg" for i, c in enumerate("abcde")]
    m = write_evaluation(out, y_true, y_pred, probs, CLASSES, meta, paths=paths)

    assert sorted(p.name for p in out.iterdir()) == sorted(EVALUATION_FILES)  # no staging left
    flat = json.loads((out / "metrics.json").read_text())
    assert flat == {
        "accuracy": 0.6,
        "macro_f1": pytest.approx(m["macro_f1"]),
        "balanced_accuracy": pytest.approx(m["balanced_accuracy"]),
        "n": 5,
        **{k: v for k, v in meta.items() if k != "tags"},  # non-scalar meta left out
    }
    assert all(not isinstance(v, (dict, list)) for v in flat.values())

    assert json.loads((out / "per_class.json").read_text()) == m["per_class"]
    per_class = pd.read_csv(out / "per_class.csv")
    assert list(per_class.columns) == ["class", "precision", "recall", "f1", "support"]
    assert list(per_class["class"]) == list(CLASSES)
    confusion = json.loads((out / "confusion.json").read_text())
    assert confusion == {"classes": list(CLASSES), "matrix": m["confusion_matrix"]}
    assert (out / "confusion.png").stat().st_size > 1000

    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns) == ["path", "actual", "predicted", "p_negative", "p_neutral", "p_positive"]
    assert list(pred["actual"]) == ["negative", "negative", "neutral", "positive", "positive"]
    assert list(pred["predicted"]) == ["negative", "neutral", "neutral", "positive", "negative"]
    assert pred[["p_negative", "p_neutral", "p_positive"]].to_numpy() == pytest.approx(probs)
    assert list(pred["path"]) == paths


def test_write_evaluation_rewrite_without_optional_columns(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("other stage's file")
    write_evaluation(out, np.array([0, 1]), np.array([0, 1]), None, CLASSES, {"stage": "zero-shot"})
    write_evaluation(out, np.array([0, 1, 2]), np.array([0, 1, 1]), None, CLASSES, {"stage": "zero-shot"})
    assert sorted(p.name for p in out.iterdir()) == sorted([*EVALUATION_FILES, "keep.txt"])
    assert json.loads((out / "metrics.json").read_text())["n"] == 3
    assert list(pd.read_csv(out / "predictions.csv").columns) == ["actual", "predicted"]


def test_write_evaluation_refuses_bad_input(tmp_path):
    y = np.array([0, 1])
    with pytest.raises(ValueError, match="shape"):
        write_evaluation(tmp_path / "a", y, y, np.ones((2, 2)), CLASSES, {})
    with pytest.raises(ValueError, match="overwrite"):
        write_evaluation(tmp_path / "b", y, y, None, CLASSES, {"accuracy": 1.0})
    assert not (tmp_path / "a" / "metrics.json").exists()


# ---------------------------------------------------------------------------- zero-shot


@pytest.mark.parametrize(
    "surprise, target", [("ignore", None), ("negative", NEG), ("neutral", NEU), ("positive", POS)]
)
def test_zero_shot_mapping_seven(surprise, target):
    assert zero_shot_mapping(SEVEN, surprise) == {0: NEG, 1: NEG, 2: NEG, 3: POS, 4: NEU, 5: NEG, 6: target}


@pytest.mark.parametrize(
    "surprise, target", [("ignore", None), ("negative", NEG), ("neutral", NEU), ("positive", POS)]
)
def test_zero_shot_mapping_eight(surprise, target):
    assert zero_shot_mapping(EIGHT, surprise) == {0: NEG, 1: NEG, 2: NEG, 3: NEG, 4: POS, 5: NEU, 6: NEG, 7: target}


def test_zero_shot_mapping_default_ignores_surprise_and_accepts_spellings():
    assert zero_shot_mapping(EIGHT)[7] is None
    assert zero_shot_mapping(["happy", " SAD ", "Neutral", "surprised"]) == {0: POS, 1: NEG, 2: NEU, 3: None}


@pytest.mark.parametrize(
    "classes, surprise, message",
    [
        ([*SEVEN[:-1], "Boredom"], "ignore", "Boredom"),
        (SEVEN, "maybe", "maybe"),
        (["Anger", "Neutral", "Anger"], "ignore", "twice"),
        (["Anger", "Neutral", "Surprise"], "ignore", "positive"),  # nothing maps to positive
    ],
)
def test_zero_shot_mapping_errors(classes, surprise, message):
    with pytest.raises(FerflowError, match=message):
        zero_shot_mapping(classes, surprise)


def test_collapse_probs_sums_and_renormalises():
    mapping = zero_shot_mapping(SEVEN, "ignore")
    probs = np.array(
        [
            [0.1, 0.1, 0.1, 0.2, 0.1, 0.1, 0.3],  # kept mass 0.7: neg 0.4, pos 0.2, neu 0.1
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # all on Surprise -> uniform
        ]
    )
    out = collapse_probs(probs, mapping)
    assert out[0] == pytest.approx([0.4 / 0.7, 0.1 / 0.7, 0.2 / 0.7])
    assert out[1] == pytest.approx([1 / 3] * 3)
    assert out.sum(axis=1) == pytest.approx([1.0, 1.0])

    # Surprise counted as positive: plain sums, already normalised
    out = collapse_probs(probs[:1], zero_shot_mapping(SEVEN, "positive"))
    assert out[0] == pytest.approx([0.4, 0.1, 0.5])
    assert out.argmax(axis=1).tolist() == [POS]


def test_collapse_equals_softmax_over_kept_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 8))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    kept = np.exp(logits[:, :7]) / np.exp(logits[:, :7]).sum(axis=1, keepdims=True)
    mapping = zero_shot_mapping(EIGHT, "ignore")
    expected = np.stack([kept[:, [0, 1, 2, 3, 6]].sum(1), kept[:, 5], kept[:, 4]], axis=1)
    assert collapse_probs(probs, mapping) == pytest.approx(expected)


def test_collapse_probs_refuses_mismatch_and_logits():
    mapping = zero_shot_mapping(EIGHT)
    with pytest.raises(ValueError, match="valence"):
        collapse_probs(np.full((2, 10), 0.1), mapping)  # va_mtl: 8 logits + valence, arousal
    with pytest.raises(ValueError, match="logits"):
        collapse_probs(np.full((1, 8), -1.0), mapping)
