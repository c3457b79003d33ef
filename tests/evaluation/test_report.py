import json
import math

import pandas as pd
import pytest

from ferflow.errors import FerflowError
from ferflow.evaluation.report import (
    COLUMNS,
    SEED_RESULTS,
    collect_results,
    compare_with_files,
    cross_dataset_matrix,
    render_markdown,
    results_table,
    seed_accuracy,
    write_report,
)

# (stage, train, model, eval) -> accuracy; "mini" is a model the seed never published.
RUNS = {
    ("fine-tuned", "LFW-FER", "enet_b0_7", "LFW-FER"): 0.885,
    ("fine-tuned", "LFW-FER", "enet_b0_7", "M-LFW-FER"): 0.41,
    ("fine-tuned", "M-LFW-FER", "enet_b0_7", "M-LFW-FER"): 0.38,
    ("fine-tuned", "M-LFW-FER", "enet_b0_7", "LFW-FER"): 0.70,
    ("fine-tuned", "M-LFW-FER-face-cut", "mini", "M-LFW-FER-face-cut"): 0.5,
    ("zero-shot", "none", "enet_b0_7", "LFW-FER"): 0.60,
    ("zero-shot", "none", "enet_b0_7", "M-LFW-FER-face-cut"): 0.55,
    ("zero-shot", "none", "mini", "M-LFW-FER-face-cut"): 0.30,
}


@pytest.fixture
def eval_root(tmp_path):
    root = tmp_path / "evaluation"
    for (stage, train, model, ds), acc in RUNS.items():
        d = root / stage / train / model / ds
        d.mkdir(parents=True)
        flat = {"accuracy": acc, "macro_f1": acc - 0.05, "balanced_accuracy": acc - 0.01, "n": 100,
                "model": model, "stage": stage}
        (d / "metrics.json").write_text(json.dumps(flat))
        (d / "per_class.json").write_text("{}")
    # a staging folder of an evaluation still being written: skipped
    staging = root / "zero-shot" / "none" / "mini" / "LFW-FER" / ".tmp-x"
    staging.mkdir(parents=True)
    (staging / "metrics.json").write_text("{}")
    return root


def test_seed_results_match_facts():
    assert SEED_RESULTS["enet_b0_7"]["LFW-FER"] == 87.4676
    assert SEED_RESULTS["enet_b0_8_best_vgaf"]["M-LFW-FER"] == 57.2294
    assert SEED_RESULTS["enet_b2_8"]["M-LFW-FER-face-cut"] == 76.9167
    assert len(SEED_RESULTS) == 5 and all(len(v) == 3 for v in SEED_RESULTS.values())
    assert seed_accuracy("enet_b0_8_va_mtl.pt", "LFW-FER") == 87.6404
    assert math.isnan(seed_accuracy("mini", "LFW-FER"))


def test_collect_results(eval_root):
    df = collect_results(eval_root)
    assert list(df.columns) == COLUMNS
    assert len(df) == len(RUNS)
    got = {(r.stage, r.train_dataset, r.model, r.eval_dataset): r.accuracy for r in df.itertuples()}
    assert got == RUNS
    assert set(df["n"]) == {100}


def test_collect_results_errors(tmp_path):
    with pytest.raises(FerflowError, match="no evaluation results"):
        collect_results(tmp_path / "missing")
    assert collect_results(tmp_path).empty
    bad = tmp_path / "fine-tuned" / "LFW-FER" / "m" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{}")
    with pytest.raises(FerflowError, match="expected <stage>"):
        collect_results(tmp_path)
    bad.unlink()
    bad = tmp_path / "fine-tuned" / "LFW-FER" / "m" / "LFW-FER" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"accuracy": "high", "macro_f1": 0.5, "n": 3}')
    with pytest.raises(FerflowError, match="'accuracy'"):
        collect_results(tmp_path)


def test_results_table_values_and_deltas(eval_root):
    table = results_table(collect_results(eval_root))
    assert list(table.index) == ["enet_b0_7", "mini"]
    assert list(table.columns.get_level_values("dataset").unique()) == ["LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut"]
    lfw = table.loc["enet_b0_7", "LFW-FER"]
    assert lfw["ours"] == pytest.approx(88.5)
    assert lfw["seed"] == 87.4676
    assert lfw["zero_shot"] == pytest.approx(60.0)
    assert lfw["ours_minus_seed"] == pytest.approx(88.5 - 87.4676)
    assert lfw["ours_minus_zero_shot"] == pytest.approx(28.5)
    masked = table.loc["enet_b0_7", "M-LFW-FER"]
    # in-domain only: the LFW-FER-trained 41 % on M-LFW-FER is cross-dataset, not "ours"
    assert masked["ours"] == pytest.approx(38.0)
    assert masked["ours_minus_seed"] == pytest.approx(38.0 - 38.6147)
    assert math.isnan(masked["zero_shot"]) and math.isnan(masked["ours_minus_zero_shot"])
    cut = table.loc["enet_b0_7", "M-LFW-FER-face-cut"]
    assert math.isnan(cut["ours"]) and cut["seed"] == 71.4757 and cut["zero_shot"] == pytest.approx(55.0)
    mini = table.loc["mini", "M-LFW-FER-face-cut"]
    assert mini["ours"] == pytest.approx(50.0) and math.isnan(mini["seed"]) and math.isnan(mini["ours_minus_seed"])
    assert mini["ours_minus_zero_shot"] == pytest.approx(20.0)


def test_cross_dataset_matrix(eval_root):
    df = collect_results(eval_root)
    m = cross_dataset_matrix(df, "enet_b0_7")
    assert list(m.index) == ["LFW-FER", "M-LFW-FER"] and list(m.columns) == ["LFW-FER", "M-LFW-FER"]
    assert m.loc["LFW-FER", "LFW-FER"] == pytest.approx(88.5)
    assert m.loc["LFW-FER", "M-LFW-FER"] == pytest.approx(41.0)  # rows: trained on
    assert m.loc["M-LFW-FER", "LFW-FER"] == pytest.approx(70.0)
    assert m.loc["M-LFW-FER", "M-LFW-FER"] == pytest.approx(38.0)
    mini = cross_dataset_matrix(df, "mini")
    assert mini.shape == (1, 1) and mini.iloc[0, 0] == pytest.approx(50.0)
    with pytest.raises(FerflowError, match="enet_b0_7, mini"):
        cross_dataset_matrix(df, "enet_b2_8")


def test_write_report(eval_root, tmp_path):
    df = collect_results(eval_root)
    out = tmp_path / "report"
    paths = write_report(df, out)
    assert paths == {"markdown": out / "results.md", "csv": out / "results.csv"}
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md"]  # no temp files

    md = paths["markdown"].read_text(encoding="utf-8")
    assert "| dataset | model | ours | seed | ours − seed | zero-shot | ours − zero-shot |" in md
    assert "| LFW-FER | enet_b0_7 | 88.50 | 87.47 | +1.03 | 60.00 | +28.50 |" in md
    assert "| M-LFW-FER | enet_b0_7 | 38.00 | 38.61 | \u22120.61 | – | – |" in md
    assert "| M-LFW-FER-face-cut | enet_b0_7 | – | 71.48 | – | 55.00 | – |" in md
    assert "| M-LFW-FER-face-cut | mini | 50.00 | – | – | 30.00 | +20.00 |" in md
    assert "real LFW emotion archives" in md and "not comparable" in md
    assert "### enet_b0_7" in md and "### mini" in md
    assert "| trained on ↓ / evaluated on → | LFW-FER | M-LFW-FER |" in md
    assert "| M-LFW-FER | 70.00 | 38.00 |" in md

    back = pd.read_csv(paths["csv"])
    pd.testing.assert_frame_equal(back, df, check_dtype=False)


def test_write_report_empty(tmp_path):
    paths = write_report(collect_results(tmp_path), tmp_path / "r")
    assert "No evaluation results found." in paths["markdown"].read_text(encoding="utf-8")
    assert pd.read_csv(paths["csv"]).columns.tolist() == COLUMNS


def test_rows_name_their_source_and_a_registry_report_notes_what_differs(eval_root):
    df = collect_results(eval_root)
    sources = {(r.stage, r.train_dataset, r.model): r.source for r in df.itertuples()}
    assert sources[("fine-tuned", "LFW-FER", "enet_b0_7")] == "run LFW-FER/enet_b0_7"
    assert sources[("zero-shot", "none", "mini")] == "zero-shot mini"
    md = render_markdown(df)
    assert "| +28.50 | 83.50 | 55.00 | +28.50 | run LFW-FER/enet_b0_7 |" in md  # "from": the in-domain run
    assert "| M-LFW-FER-face-cut | enet_b0_7 | – | 71.48 | – | 55.00 | – | – | 50.00 | – | zero-shot enet_b0_7 |" in md
    assert "| M-LFW-FER | 70.00 | 38.00 | run M-LFW-FER/enet_b0_7 |" in md and "| --- | ---: | ---: | --- |" in md

    registry = df.copy()
    registry["source"] = "models:/ferflow-lfw-fer/3 @champion"
    assert compare_with_files(registry, eval_root) == [] and compare_with_files(registry, eval_root / "none") == []
    registry.loc[(registry["model"] == "enet_b0_7") & (registry["eval_dataset"] == "M-LFW-FER"), "accuracy"] += 0.02
    notes = compare_with_files(registry, eval_root)
    assert len(notes) == 2 and notes[0].startswith(  # one per (train dataset, model)
        "`LFW-FER/enet_b0_7` accuracy: models:/ferflow-lfw-fer/3 @champion records 43.00 % on M-LFW-FER; "
        "the latest evaluation files (run LFW-FER/enet_b0_7) show 41.00 %. ")
    assert "## Registry and evaluation files differ\n\n- `LFW-FER/enet_b0_7`" in render_markdown(registry, notes)
