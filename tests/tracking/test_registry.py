"""The model registry against a real `mlflow server` (sqlite + artifacts proxied to moto S3):
log, register, promote by the gate, roll back, load the champion, concurrency, server down."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
import uuid
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file

from conftest import start_mlflow_server, stop_process
from ferflow import stages
from ferflow.config import load_params
from ferflow.labels import CLASSES
from ferflow.errors import FerflowError
from ferflow.evaluation.report import collect_results
from ferflow.tracking import aliases, packaging, queries, versioning
from ferflow.tracking.promotion import contenders, decide, passed_over

REPO = Path(__file__).resolve().parents[2]
DATASET, MODEL = "LFW-FER", "demo_tiny"
# A tiny CPU run; MLflow tracking of training is off: these tests log into runs themselves.
TRAIN = [
    "train.models=[demo_tiny]", "train.datasets=[LFW-FER]", "train.input_size=48", "train.batch_size=32",
    "train.head_stage.epochs=1", "train.full_stage.epochs=1", "train.full_stage.lr=0.002", "train.workers=0",
    "train.threads=1", "train.early_stopping_patience=0", "train.device=cpu", "tracking.enabled=false",
]

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Small demo archives prepared at 48 px, one tiny model trained on LFW-FER and
    evaluated on all three: (params file, run dir, evaluation dir)."""
    ws = tmp_path_factory.mktemp("registry-ws")
    base = load_params(REPO / "params.yaml", [
        f"demo.out_dir={ws / 'archives'}", "demo.images_per_class=40", "demo.image_size=48",
        f"data.raw_dir={ws / 'data/raw'}", f"data.prepared_dir={ws / 'data/prepared'}",
        "prepare.image_sizes=[48]", "prepare.workers=1", "fetch.progress=false",
        f"train.out_dir={ws / 'models'}", f"evaluate.out_dir={ws / 'evaluation'}", f"report.out_dir={ws / 'reports'}",
        "demo.overrides=[]",
    ])
    params_file = ws / "params.yaml"
    stages.demo_data(base, params_out=params_file)
    params = load_params(params_file, TRAIN)
    stages.fetch(params)
    stages.prepare(params)
    result = stages.train(params, DATASET, MODEL)
    stages.evaluate(params, DATASET, MODEL)
    return params_file, result.run_dir, ws / "evaluation"


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    """Point MLflow (and ferflow's tracking service, where the variable wins) at the server."""
    use_server(mlflow_server.uri, monkeypatch)
    yield mlflow_server
    mlflow.set_tracking_uri(None)


def use_server(uri: str, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)


def params_for(params_file: Path, uri: str, *extra: str):
    """Params with a fresh experiment and registered model names (the server is shared).

    tracking.tracking_uri names the server as MLFLOW_TRACKING_URI does, so that which of
    the two `service.configure` picks makes no difference."""
    uid = uuid.uuid4().hex[:8]
    names = [f"registry.names.{ds}=ferflow-test-{uid}-{ds.lower()}" for ds in ("LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut")]
    return load_params(params_file, TRAIN + [f"tracking.tracking_uri={uri}", f"tracking.experiment=exp-{uid}",
                                             *names, *extra])


def variant(trained, uri: str, dest: Path, accuracy: float | None = None, seed: int | None = None, *extra: str,
            baseline: float | None = None):
    """A copy of the trained run (weights perturbed when `seed` is given) with its own
    evaluation files, in-domain accuracy set to `accuracy` (and the zero-shot accuracy of
    its starting point to `baseline`); returns (params, run dir)."""
    params_file, run_dir, eval_dir = trained
    run = dest / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("last.pt", "mlflow_run.json"))
    if seed is not None:
        tensors = load_file(str(run / "best.safetensors"))
        key = sorted(k for k in tensors if tensors[k].is_floating_point())[-1]
        tensors[key] = tensors[key] + 1e-3 * (seed + 1)
        save_file(tensors, str(run / "best.safetensors"))
    evaluation = dest / "evaluation"
    shutil.copytree(eval_dir, evaluation)
    if accuracy is not None:
        cell = evaluation / "fine-tuned" / DATASET / MODEL / DATASET / "metrics.json"
        summary = evaluation / "fine-tuned" / DATASET / f"{MODEL}.json"
        for path, keys in ((cell, ()), (summary, (DATASET,))):
            data = json.loads(path.read_text())
            node = data[keys[0]] if keys else data
            node["accuracy"] = accuracy
            if baseline is not None and keys:
                node.update(baseline_accuracy=baseline, baseline_macro_f1=baseline - 0.1)
            path.write_text(json.dumps(data))
    return params_for(params_file, uri, f"evaluate.out_dir={evaluation}", *extra), run


def same_names(params, *others) -> list:
    """`others` with the registered model names and experiment of `params`."""
    return [o.model_copy(update={"registry": params.registry, "tracking": params.tracking}) for o in others]


def digest_tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def demo_images(params, n: int = 4) -> list[tuple[str, bytes]]:
    """(manifest path, bytes) of the first eval images of the in-domain archive."""
    manifest = pd.read_parquet(params.data.prepared_dir / DATASET / "manifest.parquet")
    rows = manifest[manifest["split"] == "eval"].sort_values("cache_index").head(n)
    archive = next(p for p in params.data.raw_dir.rglob("*.zip") if p.stem == DATASET)
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        found = []
        for path in rows["path"]:
            member = next(m for m in names if m == path or m.endswith("/" + path))
            found.append((path, zf.read(member)))
    return found


# ---------------------------------------------------------------------------- the flow


def test_a_model_below_its_zero_shot_start_is_never_promoted_unless_forced(trained, tracking, tmp_path):
    client = MlflowClient()
    params, run1 = variant(trained, tracking.uri, tmp_path / "v1", 0.55, 1, f"registry.records_dir={tmp_path / 'rec'}",
                           baseline=0.6)
    name = params.registry.name_for(DATASET)
    v1 = versioning.register(params, DATASET, run1)
    assert float(v1.tags["eval_baseline_accuracy"]) == pytest.approx(0.6)
    assert "zero-shot accuracy %" in v1.description and "| 60.00 | −5.00 |".replace("−", "-") in v1.description

    refused = stages.promote(params, DATASET)
    assert refused.action == "refused" and refused.candidate_version == "1"
    assert "0.5500" in refused.reason and "0.6000" in refused.reason and "starting point" in refused.reason
    assert "champion" not in queries.aliases(client, name)
    assert "starting point" in client.get_model_version(name, "1").tags["promotion.reason"]
    record = json.loads((params.registry.records_dir / "promotions" / f"{DATASET}.json").read_text())
    assert record["action"] == "refused"

    # One at or above its start is promoted as usual; the one below stays out.
    p2, run2 = variant(trained, tracking.uri, tmp_path / "v2", 0.62, 2, baseline=0.6)
    (p2,) = same_names(params, p2)
    v2 = versioning.register(p2, DATASET, run2)
    won = stages.promote(params, DATASET)
    assert won.action == "promoted" and won.candidate_version == str(v2.version)
    again = stages.register(p2, DATASET, MODEL, run2)  # nothing new: says so, and claims no challenger
    assert (again.version, again.created, again.aliases) == (v2.version, False, ["champion"])
    record = json.loads((params.registry.records_dir / DATASET / f"{MODEL}.json").read_text())
    assert (record["version"], record["aliases"], record["created"]) == (str(v2.version), ["champion"], False)

    forced = aliases.promote(params, name, force=True)  # nothing newer: the challenger alias is gone
    assert forced.action == "refused"
    p3, run3 = variant(trained, tracking.uri, tmp_path / "v3", 0.7, 3, baseline=0.75)
    (p3,) = same_names(params, p3)
    v3 = versioning.register(p3, DATASET, run3)
    assert stages.promote(params, DATASET).action == "refused"
    forced = stages.promote(params, DATASET, force=True)
    assert forced.action == "promoted" and forced.candidate_version == str(v3.version)

    results = queries.registry_results(params)
    zero = results[(results["stage"] == "zero-shot") & (results["eval_dataset"] == DATASET)]
    assert list(zero["accuracy"]) == [pytest.approx(0.75)]  # the champion's starting point


def test_dvc_experiment_trials_are_tagged_and_never_move_champion(trained, tracking, tmp_path, monkeypatch):
    """Inside `dvc exp run` (DVC names the trial in DVC_EXP_NAME) a version is registered
    with the trial's name, and promote leaves champion alone unless params ask for it."""
    client = MlflowClient()
    params, run1 = variant(trained, tracking.uri, tmp_path / "v1", 0.6, 1, f"registry.records_dir={tmp_path / 'rec'}")
    name = params.registry.name_for(DATASET)
    versioning.register(params, DATASET, run1)
    assert stages.promote(params, DATASET).action == "promoted"  # v1 champion, outside any trial

    monkeypatch.setenv("DVC_EXP_NAME", "lucid-lr")
    p2, run2 = variant(trained, tracking.uri, tmp_path / "v2", 0.9, 2)
    (p2,) = same_names(params, p2)
    v2 = versioning.register(p2, DATASET, run2)
    assert v2.tags["dvc.experiment"] == "lucid-lr"
    skipped = stages.promote(params, DATASET)
    assert skipped.action == "skipped" and "lucid-lr" in skipped.reason and skipped.champion_version == "1"
    assert queries.aliases(client, name)["champion"] == "1" and queries.aliases(client, name)["challenger"] == str(v2.version)
    record = json.loads((params.registry.records_dir / "promotions" / f"{DATASET}.json").read_text())
    assert record["action"] == "skipped" and record["champion_after"] == "1"

    asked = params.model_copy(update={"registry": params.registry.model_copy(update={"promote_in_experiments": True})})
    won = stages.promote(asked, DATASET)
    assert won.action == "promoted" and queries.aliases(client, name)["champion"] == str(v2.version)


def test_register_promote_rollback_then_serve_champion(trained, tracking, tmp_path):
    client = MlflowClient()
    uri = tracking.uri
    # The tiny trained model is near chance: no floor here, this test follows the plumbing.
    params, run1 = variant(trained, uri, tmp_path / "v1", None, None, "registry.first_champion_min=0")
    name = params.registry.name_for(DATASET)

    # Training's tracking would have made this run; lineage tags on it reach the version.
    experiment = client.create_experiment(params.tracking.experiment)
    run = client.create_run(experiment, tags={"lineage.git_commit": "0123abc"})
    (run1 / "mlflow_run.json").write_text(json.dumps({"run_id": run.info.run_id}))
    info = packaging.log_model(run1)
    assert info.run_id == run.info.run_id and info.model_id

    v1 = versioning.register(params, DATASET, run1)
    assert v1.version in ("1", 1) and v1.aliases == ["challenger"] and v1.created
    # The model logged above is reused, not logged twice.
    assert [o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs] == [info.model_id]
    tags = v1.tags
    truth = json.loads((trained[2] / "fine-tuned" / DATASET / f"{MODEL}.json").read_text())
    report = json.loads((params.data.prepared_dir / DATASET / "report.json").read_text())
    assert float(tags["eval_accuracy"]) == pytest.approx(truth[DATASET]["accuracy"])
    assert float(tags["eval_M-LFW-FER_accuracy"]) == pytest.approx(truth["M-LFW-FER"]["accuracy"])
    assert tags["eval.manifest_sha256"] == report["manifest_sha256"]
    run_info = json.loads((run1 / "run.json").read_text())
    assert tags["recipe.hash"] == run_info["recipe_hash"] and tags["model.name"] == MODEL
    assert tags["model.weights_sha256"] == hashlib.sha256((run1 / "best.safetensors").read_bytes()).hexdigest()
    assert tags["lineage.git_commit"] == "0123abc" and tags["source_run_id"] == run.info.run_id
    assert "non-commercial" in v1.description and "| LFW-FER (in-domain) |" in v1.description
    again = versioning.register(params, DATASET, run1)
    assert again.version == v1.version and not again.created  # idempotent, and says so

    first = aliases.promote(params, name)
    assert first.action == "promoted" and first.candidate_version == "1" and "no champion" in first.reason
    assert queries.aliases(client, name) == {"champion": "1"}
    assert client.get_model_version(name, "1").tags["promotion.decision"] == "promoted"
    again = versioning.register(params, DATASET, run1)  # holds champion now, not challenger
    assert (again.version, again.created, again.aliases) == (v1.version, False, ["champion"])

    # Worse, registered from a run dir without any MLflow run: refused, and the tags say why.
    acc1 = float(tags["eval_accuracy"])
    p2, run2 = variant(trained, uri, tmp_path / "v2", acc1 - 0.1, 2)
    (p2,) = same_names(params, p2)
    v2 = versioning.register(p2, DATASET, run2)
    assert v2.tags["ferflow.registered_from_run_dir"] == "true"
    runs_before = len(client.search_runs([experiment]))
    assert versioning.register(p2, DATASET, run2).version == v2.version  # a retry adds nothing
    assert len(client.search_runs([experiment])) == runs_before
    refused = aliases.promote(params, name)
    assert refused.action == "refused" and refused.candidate_version == str(v2.version)
    assert refused.champion_version == "1" and refused.champion_value == pytest.approx(acc1)
    t2 = client.get_model_version(name, v2.version).tags
    assert t2["promotion.decision"] == "refused" and "does not beat champion v1" in t2["promotion.reason"]
    assert float(t2["promotion.champion_value"]) == pytest.approx(acc1) and t2["promotion.at"]
    assert queries.aliases(client, name)["champion"] == "1"

    # Better, with an mlflow_run.json naming a run the server does not know: promoted.
    p3, run3 = variant(trained, uri, tmp_path / "v3", acc1 + 0.05, 3)  # a made-up number: it may exceed 1
    (p3,) = same_names(params, p3)
    (run3 / "mlflow_run.json").write_text(json.dumps({"run_id": uuid.uuid4().hex}))
    v3 = versioning.register(p3, DATASET, run3)
    source = client.get_run(v3.run_id)
    assert source.data.tags["ferflow.registered_from_run_dir"] == "true"
    assert "ferflow.original_run_id" in source.data.tags
    won = aliases.promote(params, name)
    assert won.action == "promoted" and won.candidate_version == str(v3.version), won
    assert queries.aliases(client, name) == {"champion": str(v3.version), "previous-champion": "1"}
    assert client.get_model_version(name, "1").tags["promotion.replaced_by"] == str(v3.version)

    back = aliases.rollback(params, name)
    assert back.action == "rolled-back" and back.candidate_version == "1"
    assert queries.aliases(client, name) == {"champion": "1", "previous-champion": str(v3.version)}
    assert client.get_model_version(name, "1").tags["promotion.decision"] == "rolled-back"
    # The version rolled back from is not promoted again by the next run of the gate.
    assert aliases.promote(params, name).action == "refused"
    assert queries.aliases(client, name)["champion"] == "1"

    # Evaluated on other data: not comparable, refused; force overrides and says so.
    other = tmp_path / "prepared-other" / DATASET
    other.mkdir(parents=True)
    (other / "report.json").write_text(json.dumps({**report, "manifest_sha256": "f" * 64}))
    p4, run4 = variant(trained, uri, tmp_path / "v4", 0.99, 4, f"data.prepared_dir={other.parent}")
    (p4,) = same_names(params, p4)
    v4 = versioning.register(p4, DATASET, run4)
    stale = aliases.promote(params, name)
    assert stale.action == "refused" and stale.candidate_version == str(v4.version)
    assert "not comparable" in stale.reason
    forced = aliases.promote(params, name, force=True)
    assert forced.action == "promoted" and forced.candidate_version == str(v4.version)
    assert "forced" in client.get_model_version(name, v4.version).tags["promotion.reason"]
    aliases.rollback(params, name)
    assert queries.aliases(client, name) == {"champion": "1", "previous-champion": str(v4.version)}

    # The registry renders the same long table as the evaluation files (champion v1's).
    from_registry = queries.registry_results(params)
    expected = collect_results(trained[2])
    expected = expected[expected["stage"] == "fine-tuned"]
    assert set(from_registry["source"]) == {f"models:/{name}/1 @champion"}  # each row names its version
    assert set(expected["source"]) == {f"run {DATASET}/{MODEL}"}  # ... and from the files, its run
    pd.testing.assert_frame_equal(sort(from_registry).drop(columns="source"), sort(expected).drop(columns="source"),
                                  check_exact=False, rtol=1e-12)

    # The champion loads by alias and predicts like `ferflow evaluate` did.
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    images = demo_images(params)
    encoded = pd.DataFrame({"image": [base64.b64encode(b).decode() for _, b in images]})
    out = model.predict(encoded)
    assert list(out.columns) == ["label", "p_negative", "p_neutral", "p_positive"]
    assert set(out["label"]) <= set(CLASSES)
    probs = out[["p_negative", "p_neutral", "p_positive"]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-6)
    evaluated = pd.read_csv(trained[2] / "fine-tuned" / DATASET / MODEL / DATASET / "predictions.csv")
    evaluated = evaluated.set_index("path").loc[[p for p, _ in images]]
    assert np.allclose(probs, evaluated[["p_negative", "p_neutral", "p_positive"]].to_numpy(), atol=1e-5)
    files = []
    for i, (_, data) in enumerate(images):
        files.append(tmp_path / f"img{i}.jpg")
        files[-1].write_bytes(data)
    by_path = model.predict(pd.DataFrame({"path": [str(f) for f in files]}))
    assert np.allclose(by_path[["p_negative", "p_neutral", "p_positive"]].to_numpy(), probs, atol=1e-6)
    raw = model.predict(pd.DataFrame({"image": [data for _, data in images]}))
    assert list(raw["label"]) == list(out["label"])
    with pytest.raises(Exception, match=r"row 1: .*base64"):
        model.predict(pd.DataFrame({"image": [encoded["image"][0], "not base64!"]}))


def sort(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["model", "train_dataset", "eval_dataset"]).reset_index(drop=True)


# ---------------------------------------------------------------------------- concurrency


def test_concurrent_registrations_get_distinct_versions(trained, tracking, tmp_path):
    pa, run_a = variant(trained, tracking.uri, tmp_path / "a", 0.81, 11)
    pb, run_b = variant(trained, tracking.uri, tmp_path / "b", 0.92, 12)
    (pb,) = same_names(pa, pb)
    name = pa.registry.name_for(DATASET)
    barrier, results, errors = threading.Barrier(2), {}, []

    def go(key, p, run):
        try:
            barrier.wait()
            results[key] = versioning.register(p, DATASET, run)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=a) for a in (("a", pa, run_a), ("b", pb, run_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    client = MlflowClient()
    versions = {key: client.get_model_version(name, v.version) for key, v in results.items()}
    assert {str(v.version) for v in versions.values()} == {"1", "2"}
    for key, run, acc in (("a", run_a, 0.81), ("b", run_b, 0.92)):
        tags = versions[key].tags
        assert tags["model.weights_sha256"] == hashlib.sha256((run / "best.safetensors").read_bytes()).hexdigest()
        assert float(tags["eval_accuracy"]) == pytest.approx(acc)
        assert versions[key].run_id == tags["source_run_id"]
    assert queries.aliases(client, name)["challenger"] in {"1", "2"}
    decision = aliases.promote(pa, name)  # whichever holds `challenger`, the better one wins
    assert decision.action == "promoted" and decision.candidate_version == str(versions["b"].version)
    assert queries.aliases(client, name) == {"champion": str(versions["b"].version)}
    loser = client.get_model_version(name, versions["a"].version).tags
    assert loser.get("promotion.decision", "refused") == "refused"


# ---------------------------------------------------------------------------- server down


def test_register_with_server_down_then_again_later(trained, s3_server, tmp_path, monkeypatch):
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = start_mlflow_server(tmp_path / "first", s3_server, f"down-{uuid.uuid4().hex[:8]}")
    params, run = variant(trained, first.uri, tmp_path / "v")
    try:
        use_server(first.uri, monkeypatch)
        client = MlflowClient()
        run_id = client.create_run(client.create_experiment(params.tracking.experiment)).info.run_id
        (run / "mlflow_run.json").write_text(json.dumps({"run_id": run_id}))
    finally:
        stop_process(first.proc)
    before = digest_tree(run)
    try:
        with pytest.raises(FerflowError, match=re.escape(first.uri) + ".*not reachable"):
            versioning.register(params, DATASET, run)
        assert digest_tree(run) == before  # nothing written, nothing lost

        second = start_mlflow_server(tmp_path / "second", s3_server, f"later-{uuid.uuid4().hex[:8]}")
        try:
            use_server(second.uri, monkeypatch)
            later = params.model_copy(update={"tracking": params.tracking.model_copy(update={"tracking_uri": second.uri})})
            version = versioning.register(later, DATASET, run)
            assert version.aliases == ["challenger"] and version.tags["ferflow.registered_from_run_dir"] == "true"
            source = MlflowClient().get_run(version.run_id)
            assert source.data.tags["ferflow.original_run_id"] == run_id
            assert digest_tree(run) == before
        finally:
            stop_process(second.proc)
    finally:
        mlflow.set_tracking_uri(None)


# ---------------------------------------------------------------------------- the gate alone


def _mv(version: int, accuracy: float | None, digest: str = "a" * 64, **extra: str):
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    tags = {"eval.manifest_sha256": digest, "eval.split": "eval", **extra}
    if accuracy is not None:
        tags["eval_accuracy"] = repr(accuracy)
    return ModelVersion("m", str(version), 0, tags=[ModelVersionTag(k, v) for k, v in tags.items()])


@pytest.mark.parametrize("challenger_acc, min_delta, action", [
    (0.80, 0.0, "refused"),   # a tie is not an improvement
    (0.805, 0.01, "refused"),  # better, but by less than min_delta
    (0.82, 0.01, "promoted"),
    (0.79, 0.0, "refused"),
])
def test_gate_needs_a_strict_improvement_of_at_least_min_delta(challenger_acc, min_delta, action):
    champion, challenger = _mv(1, 0.80), _mv(2, challenger_acc)
    decision = decide("m", champion, challenger, [challenger], "eval_accuracy", min_delta, False)
    assert (decision.action, decision.candidate_version, decision.champion_version) == (action, "2", "1")
    assert decision.tags()["promotion.decision"] == action and decision.tags()["promotion.champion_value"] == "0.8"


def test_gate_other_data_missing_metric_and_newest_data_first():
    champion = _mv(1, 0.80)
    other = _mv(2, 0.95, "b" * 64)
    refused = decide("m", champion, other, [other], "eval_accuracy", 0.0, False)
    assert refused.action == "refused" and "not comparable" in refused.reason
    unevaluated = _mv(3, None)
    assert "no 'eval_accuracy' tag" in decide("m", champion, unevaluated, [unevaluated],
                                              "eval_accuracy", 0.0, False).reason
    # No champion: a better score on older data loses to the newest data's best.
    old, new_a, new_b = _mv(1, 0.99, "o" * 64), _mv(2, 0.70), _mv(3, 0.75)
    first = decide("m", None, None, [old, new_a, new_b], "eval_accuracy", 0.0, False)
    assert (first.action, first.candidate_version) == ("promoted", "3")


def test_contenders_and_a_challenger_passed_over():
    demoted = {"rollback.demoted_at": "2024-01-01T00:00:00+00:00"}
    v1, v2, v3, v4 = _mv(1, 0.80), _mv(2, 0.90), _mv(3, 0.95, **demoted), _mv(4, 0.85)
    # Newer than the champion and not demoted by a rollback; the challenger always counts.
    champion, challenger, candidates = contenders([v1, v2, v3, v4], {"champion": "2", "challenger": "1"})
    assert (champion, challenger, candidates) == (v2, v1, [v1, v4])
    assert contenders([v1, v2], {"champion": "2", "challenger": "2"}) == (v2, None, [])
    # Two registrations raced for `challenger`: v3 holds it, v4 (newer, better) wins the gate.
    v3 = _mv(3, 0.82)
    decision = decide("m", v1, v3, [v3, v4], "eval_accuracy", 0.0, False, at="2024-01-02T00:00:00+00:00")
    assert (decision.action, decision.candidate_version, decision.at) == ("promoted", "4", "2024-01-02T00:00:00+00:00")
    lost = passed_over(decision, v3)
    assert (lost.action, lost.candidate_version, lost.candidate_value) == ("refused", "3", 0.82)
    assert lost.reason.startswith("v4 was promoted instead: ") and lost.champion_version == "1"


@pytest.mark.parametrize("accuracy, start, action, why", [
    (0.3333, None, "refused", "is below registry.first_champion_min 0.4"),  # chance level, nothing to beat
    (0.45, None, "promoted", "reaches registry.first_champion_min 0.4"),
    (0.70, 0.72, "refused", "below its starting point"),  # the old rule still holds first
    (0.72, 0.72, "refused", "does not beat the zero-shot start"),  # equal is not beating it
    (0.38, 0.30, "promoted", "beats the zero-shot start"),  # the start, where recorded, is the bar
])
def test_a_first_champion_must_beat_its_zero_shot_start_else_the_floor(accuracy, start, action, why):
    extra = {} if start is None else {"eval_baseline_accuracy": repr(start)}
    challenger = _mv(1, accuracy, **extra)
    decision = decide("m", None, challenger, [challenger], "eval_accuracy", 0.0, False, first_min=0.40)
    assert (decision.action, decision.candidate_version) == (action, "1") and why in decision.reason, decision.reason
    assert decide("m", None, challenger, [challenger], "eval_accuracy", 0.0, True, first_min=0.40).promoted  # --force


def test_a_first_champion_is_the_best_that_clears_its_bar():
    # v2 scores more but not above its own start; v1 clears the floor: v1 serves first.
    v1, v2 = _mv(1, 0.50), _mv(2, 0.60, eval_baseline_accuracy="0.6")
    decision = decide("m", None, v2, [v1, v2], "eval_accuracy", 0.0, False, first_min=0.40)
    assert (decision.action, decision.candidate_version) == ("promoted", "1"), decision
    # On another gate metric the start of that metric is the bar.
    f1 = _mv(3, 0.55, eval_macro_f1="0.35", eval_baseline_macro_f1="0.36")
    refused = decide("m", None, f1, [f1], "eval_macro_f1", 0.0, False, first_min=0.0)
    assert refused.action == "refused" and "(0.3600)" in refused.reason
