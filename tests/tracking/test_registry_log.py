"""The registry explains itself (issue 13): the promotion log, `ferflow registry`, the first
champion's floor, re-registration that says so, and reports that name their version.

Fast: versions are made with MlflowClient on an embedded sqlite store in tmp (the gate
reads tags only); registering a trained run again is checked in test_registry."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from ferflow import stages
from ferflow.commandline import out
from ferflow.config import load_params
from ferflow.errors import ConfigError
from ferflow.tracking import aliases, history, queries, service, versioning
from ferflow.tracking.promotion import PromotionDecision
from serving.test_kserve import ferflow  # the CLI in-process: (exit code, stdout, stderr)
from tracking.test_registry import DATASET, MODEL, REPO

MANIFEST = "c" * 64


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory) -> Path:
    """One embedded store for the module (made once: creating the schema takes seconds)."""
    return tmp_path_factory.mktemp("registry-log") / "mlflow.db"


@pytest.fixture
def store(sqlite_db, tmp_path, monkeypatch):
    """Params on the module's sqlite store with a registered model of its own, its client,
    the model's name and a params file for the CLI."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(REPO / "params.yaml", [
        f"tracking.tracking_uri=sqlite:///{sqlite_db}", f"tracking.artifact_location={sqlite_db.parent / 'art'}",
        f"registry.records_dir={tmp_path / 'registry'}", f"evaluate.out_dir={tmp_path / 'evaluation'}",
        f"report.out_dir={tmp_path / 'reports'}", f"registry.names.{DATASET}=log-{uuid.uuid4().hex[:8]}",
    ])
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    client = service.connect(params)
    name = params.registry.name_for(DATASET)
    client.create_registered_model(name)
    return params, client, name, params_file


def made(client, name: str, accuracy: float, start: float | None = None, **extra: str):
    """A version as `register` tags it (evaluated on LFW-FER), now the challenger."""
    tags = {"eval.manifest_sha256": MANIFEST, "eval.split": "eval", "eval.datasets": DATASET, "model.name": MODEL,
            "model.base_checkpoint": "hf://demo/tiny.pt", "eval_accuracy": repr(accuracy),
            f"eval_{DATASET}_accuracy": repr(accuracy), f"eval_{DATASET}_macro_f1": "0.3", f"eval_{DATASET}_n": "30",
            **extra}
    if start is not None:
        tags.update({"eval_baseline_accuracy": repr(start), f"eval_{DATASET}_baseline_accuracy": repr(start)})
    version = client.create_model_version(name, source="file:///nowhere/model", tags=tags)
    client.set_registered_model_alias(name, "challenger", version.version)
    return version


# ---------------------------------------------------------------------------- the log


def test_every_decision_is_appended_to_the_log_and_the_latest_to_the_dvc_out(store):
    params, client, name, _ = store
    made(client, name, 0.3333)  # chance level, nothing to beat: no first champion
    assert stages.promote(params, DATASET).action == "refused"
    assert "champion" not in queries.aliases(client, name)
    made(client, name, 0.45)
    assert stages.promote(params, DATASET).candidate_version == "2"
    made(client, name, 0.60, start=0.55)
    assert stages.promote(params, DATASET).candidate_version == "3"
    stages.promote(params, DATASET, rollback=True)

    log = history.read(client.get_registered_model(name).tags)
    assert [(e["action"], e["candidate_version"], e["champion_after"]) for e in log] == [
        ("refused", "1", None), ("promoted", "2", "2"), ("promoted", "3", "3"), ("rolled-back", "2", "2")]
    assert "first_champion_min 0.4" in log[0]["reason"] and log[2]["champion_version"] == "2"
    latest = json.loads((params.registry.records_dir / "promotions" / f"{DATASET}.json").read_text())
    assert latest == {k: v for k, v in log[-1].items() if k != "key"}  # the DVC out: the last entry, as before


def test_concurrent_promotes_take_turns_and_none_is_lost(store):
    params, client, name, _ = store
    made(client, name, 0.7)
    barrier, errors = threading.Barrier(4), []

    def go():
        try:
            barrier.wait()
            aliases.promote(params, name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    log = history.read(client.get_registered_model(name).tags)
    # Under the store lock one promotes, the others find nothing newer than the champion.
    assert sorted(e["action"] for e in log) == ["promoted", "refused", "refused", "refused"]
    assert queries.aliases(client, name) == {"champion": "1"}


def test_log_keys_sort_in_time_order_and_odd_entries_stay_visible():
    keys = [history.entry_key(t) for t in (9, 10, 10**18)]
    assert sorted(keys) == keys and len(set(history.entry_key(5) for _ in range(50))) == 50
    decision = PromotionDecision(name="m", action="refused", reason="x" * 9000, at="2024-01-01T00:00:00+00:00",
                                 metric="eval_accuracy", min_delta=0.0)
    tags = {keys[1]: json.dumps(history.entry(decision)), keys[0]: "edited by hand", "other": "{}"}
    read = history.read(tags)
    assert [e["key"] for e in read] == keys[:2] and read[0]["unreadable"] == "edited by hand"
    assert len(read[1]["reason"]) == history.MAX_REASON


# ---------------------------------------------------------------------------- ferflow registry


def test_registry_command_shows_champion_versions_and_why(store, capsys, monkeypatch):
    params, client, name, params_file = store
    monkeypatch.setattr(out, "_width", 200)  # captured output is no terminal: rich would fold at 80
    run = client.create_run(service.current_experiment_id()).info.run_id
    made(client, name, 0.3333)
    stages.promote(params, DATASET)
    made(client, name, 0.62, start=0.60, source_run_id=run, **{"dvc.experiment": "lucid-lr"})
    stages.promote(params, DATASET)

    code, text, _ = ferflow(capsys, "registry", "--params", params_file)
    assert code == 0 and f"{name} (LFW-FER): champion v2" in text
    assert "0.6200" in text and "0.6000" in text and MANIFEST[:12] in text and "hf://demo/tiny.pt" in text
    assert f"{run} (trial lucid-lr)" in text and "beats the zero-shot start" in text
    assert "first_champion_min 0.4" in text

    code, text, _ = ferflow(capsys, "registry", "--params", params_file, "--json", "-d", DATASET, "--history", "1")
    (model,) = json.loads(text)["models"]
    assert model["champion"] == "2" and model["aliases"] == {"champion": "2"}
    v1, v2 = model["versions"]
    assert (v1["decision"], v1["aliases"], v1["metric_value"]) == ("refused", [], 0.3333)
    assert v2["start_value"] == 0.6 and v2["eval_manifest_sha256"] == MANIFEST and v2["dvc_experiment"] == "lucid-lr"
    assert [e["action"] for e in model["history"]] == ["promoted"]  # --history 1: the latest


def test_registry_command_names_a_dataset_without_a_registered_model(store, capsys):
    code, _, err = ferflow(capsys, "registry", "--params", store[3], "-d", "M-LFW-FER")
    assert code == 1 and "no registered model 'ferflow-m-lfw-fer' for dataset M-LFW-FER" in err
    code, _, err = ferflow(capsys, "registry", "--params", store[3], "-d", "../x")
    assert code == 2 and "../x" in err


# ---------------------------------------------------------------------------- reports


def test_registry_report_names_the_version_and_explains_a_difference(store):
    params, client, name, _ = store
    made(client, name, 0.3333)
    made(client, name, 0.5)
    stages.promote(params, DATASET)
    cell = params.evaluate.out_dir / "fine-tuned" / DATASET / MODEL / DATASET
    cell.mkdir(parents=True)
    (cell / "metrics.json").write_text(json.dumps({"accuracy": 0.3125, "macro_f1": 0.3, "n": 32}))

    results, paths = stages.report(params, from_registry=True)
    assert list(results["source"]) == [f"models:/{name}/2 @champion"]
    md = paths["markdown"].read_text(encoding="utf-8")
    assert f"| models:/{name}/2 @champion |" in md and "## Registry and evaluation files differ" in md
    assert f"models:/{name}/2 @champion records 50.00 % on {DATASET}; the latest evaluation files " \
           f"(run {DATASET}/{MODEL}) show 31.25 %" in md and "retrained or re-evaluated" in md

    results, paths = stages.report(params)  # from the files: the run is named, nothing to compare
    assert list(results["source"]) == [f"run {DATASET}/{MODEL}"]
    md = paths["markdown"].read_text(encoding="utf-8")
    assert f"| run {DATASET}/{MODEL} |" in md and "Registry and evaluation files differ" not in md


# ---------------------------------------------------------------------------- registering again


def test_registering_the_same_weights_again_says_which_version_holds_them(store, capsys, monkeypatch):
    """The CLI's words; `register` finding the version, and the DVC record, are checked on a
    trained run in test_registry."""
    params, client, name, params_file = store
    made(client, name, 0.6)
    stages.promote(params, DATASET)
    found = versioning.RegisteredVersion(client.get_model_version(name, "1"), created=False)
    monkeypatch.setattr(stages, "register", lambda *_: found)
    code, text, err = ferflow(capsys, "register", "-d", DATASET, "-m", MODEL, "--params", params_file)
    assert code == 0 and not text.startswith("registered") and "challenger" not in text, err
    assert f"{name}: already registered as version 1 (alias champion; last promotion decision: promoted); " \
           "nothing new registered" in " ".join(text.split())

    monkeypatch.setattr(stages, "register", lambda *_: versioning.RegisteredVersion(found, created=True))
    _, text, _ = ferflow(capsys, "register", "-d", DATASET, "-m", MODEL, "--params", params_file)
    assert text.startswith(f"registered {name} version 1 (alias champion)")


@pytest.mark.parametrize("value, why", [("1.5", "less than or equal to 1"), ("-0.1", "greater than or equal to 0"),
                                        ("true", "not a boolean"), (".nan", "finite number")])
def test_first_champion_min_is_a_fraction(value, why):
    with pytest.raises(ConfigError, match=rf"registry\.first_champion_min: .*{why}"):
        load_params(REPO / "params.yaml", [f"registry.first_champion_min={value}"])
    assert load_params(REPO / "params.yaml").registry.first_champion_min == 0.40  # params.yaml's, commented
