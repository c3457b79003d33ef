"""ferflow.layout: the one owner of on-disk names and paths (issue 12). Its paths are the
ones dvc.yaml declares, it imports nothing of ferflow's layers, and run.json has one reader
whose every failure names the file."""

import ast
import json
import sys
from pathlib import Path

import pytest
import yaml

from ferflow import layout
from ferflow.errors import FerflowError

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "ferflow"
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# dvc.yaml's templates, filled with stand-ins for the params and loop items.
FILL = {"${data.prepared_dir}": "P", "${train.out_dir}": "T", "${evaluate.out_dir}": "E", "${report.out_dir}": "R",
        "${registry.records_dir}": "G", "${item.dataset}": "D", "${item.model}": "M", "${key}": "D", "${item}": "X"}


def _paths(stage: str, section: str) -> set[Path]:
    body = DVC[stage].get("do", DVC[stage])
    found = set()
    for entry in body.get(section, []):
        text = next(iter(entry)) if isinstance(entry, dict) else entry
        for var, value in FILL.items():
            text = text.replace(var, value)
        found.add(Path(text))
    return found


def test_dvc_yaml_declares_the_paths_layout_builds():
    run = layout.run_dir("T", "D", "M")
    assert _paths("train", "outs") == {run / n for n in (layout.WEIGHTS, layout.RUN_JSON, layout.HISTORY_JSON,
                                                          layout.LAST, layout.MLFLOW_RUN)}
    assert _paths("train", "metrics") == {run / layout.TRAIN_METRICS}
    assert _paths("train", "plots") == {run / layout.HISTORY_CSV}
    assert layout.prepared_dir("P", "D") in _paths("train", "deps")
    assert _paths("prepare", "outs") == {layout.prepared_dir("P", "D")}

    evaluated = layout.eval_dir("E", "D", "M")
    assert {run / layout.WEIGHTS, run / layout.RUN_JSON} <= _paths("evaluate", "deps")
    assert _paths("evaluate", "outs") == {evaluated}
    assert _paths("evaluate", "metrics") == {layout.summary_path(evaluated)}
    assert _paths("evaluate", "plots") == {layout.predictions_plot_path(evaluated)}
    zero = layout.zero_shot_dir("E", "X")
    assert _paths("zero-shot", "outs") == {zero}
    assert _paths("zero-shot", "metrics") == {layout.summary_path(zero)}

    assert {run / layout.MLFLOW_RUN, layout.summary_path(evaluated)} <= _paths("register", "deps")
    assert _paths("register", "outs") == {layout.registry_record("G", "D", "M")}
    assert _paths("promote", "outs") == {layout.promotion_record("G", "X")}
    assert _paths("report", "outs") == {Path("R") / layout.RESULTS_MD, Path("R") / layout.RESULTS_CSV}


def test_evaluation_paths():
    root = layout.eval_dir("evaluation", "LFW-FER", "enet_b0_7")
    assert root == Path("evaluation/fine-tuned/LFW-FER/enet_b0_7")
    assert layout.eval_cell(root, "M-LFW-FER") / layout.EVAL_METRICS == root / "M-LFW-FER" / "metrics.json"
    assert layout.summary_path(root) == Path("evaluation/fine-tuned/LFW-FER/enet_b0_7.json")
    assert layout.predictions_plot_path(root) == Path("evaluation/fine-tuned/LFW-FER/enet_b0_7.predictions.csv")
    assert layout.zero_shot_dir("evaluation", "mini") == Path("evaluation/zero-shot/none/mini")
    # metrics.json last: its presence marks a complete set
    assert layout.EVALUATION_FILES[-1] == layout.EVAL_METRICS and len(set(layout.EVALUATION_FILES)) == 6


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_layout_is_a_leaf():
    """Every layer reads its names from layout, so layout reads from none of them."""
    ours = {m for m in _imports(SRC / "layout.py") if m.split(".")[0] == "ferflow"}
    assert ours <= {"ferflow.errors"}, ours
    others = {m.split(".")[0] for m in _imports(SRC / "layout.py")} - {"ferflow", "__future__"}
    assert others <= set(sys.stdlib_module_names), others


def test_models_import_no_training():
    """models sits below training: the inference path needs no training module for names."""
    for path in (SRC / "models").glob("*.py"):
        assert not any(m.startswith("ferflow.training") for m in _imports(path)), path


def test_read_run_info(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FerflowError, match="run.json: missing"):
        layout.read_run_info(run)
    run.mkdir()
    (run / layout.RUN_JSON).write_text("{not json")
    with pytest.raises(FerflowError, match=r"run\.json: not valid JSON"):
        layout.read_run_info(run)
    (run / layout.RUN_JSON).write_bytes(b"\xff\xfe")
    with pytest.raises(FerflowError, match=r"run\.json: unreadable"):
        layout.read_run_info(run)
    (run / layout.RUN_JSON).write_text("[1, 2]")
    with pytest.raises(FerflowError, match="expected a JSON object, got list"):
        layout.read_run_info(run)
    (run / layout.RUN_JSON).write_text(json.dumps({"model": "demo_tiny"}))
    with pytest.raises(FerflowError, match=f"{run / layout.RUN_JSON}: missing input_size"):
        layout.read_run_info(run)
    assert layout.read_run_info(run, required=()) == {"model": "demo_tiny"}
    (run / layout.RUN_JSON).write_text(json.dumps({"model": "demo_tiny", "input_size": 48}))
    assert layout.read_run_info(run)["input_size"] == 48


def test_trained_files_name_both_files(tmp_path):
    (tmp_path / layout.RUN_JSON).write_text("{}")
    with pytest.raises(FerflowError, match=r"no trained model \(run\.json / best\.safetensors missing\)"):
        layout.trained_files(tmp_path)
    (tmp_path / layout.WEIGHTS).write_bytes(b"")
    assert layout.trained_files(tmp_path) == (tmp_path / layout.RUN_JSON, tmp_path / layout.WEIGHTS)
