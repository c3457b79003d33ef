"""ONNX export: onnxruntime gives the torch Predictor's probabilities (to 1e-4) on real
images, for any batch size; the metadata round-trips; DAN, zero-shot and unexportable
models; bad references; the ONNX logged with a registered version and served by the
pyfunc on onnxruntime (serve.engine: onnx).

Real images: the demo archives (always, CI included); the stand-in eval archive with the
fer7-b0-112 checkpoint too when ../shared holds them (the development machines)."""

from __future__ import annotations

import base64
import hashlib
import json
import types
import uuid
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from ferflow.models.weights import tensors_sha256
from ferflow import cli, stages
from ferflow.config import load_params
from ferflow.data.decode import decode_photo
from ferflow.errors import FerflowError
from ferflow.labels import CLASSES
from ferflow.models import export, inference, zoo
from ferflow.models.preprocess import Preprocess
from ferflow.serving.reference import export_reference

from .conftest import MLFLOW_ENV

REPO = Path(__file__).resolve().parents[2]
DATASET, MODEL, SIZE = "LFW-FER", "demo_tiny", 48
STANDIN = REPO.parent / "shared" / "datasets" / "lfw-emotion-standin" / "LFW-FER.zip"
FER7 = REPO.parent / "shared" / "models" / "fer7-b0-112"

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Demo archives (64 px images, so decoding really resizes), LFW-FER prepared at 48 px,
    demo_tiny trained 1 + 1 epochs on CPU and evaluated; (root, params file, params, run dir)."""
    root = tmp_path_factory.mktemp("export-ws")
    with pytest.MonkeyPatch.context() as mp:
        for key in MLFLOW_ENV:
            mp.delenv(key, raising=False)
        mp.setenv("FERFLOW_CACHE", str(root / "cache"))
        base = load_params(REPO / "params.yaml", [
            f"demo.out_dir={root / 'archives'}", "demo.images_per_class=32", "demo.image_size=64", "demo.overrides=[]",
            f"data.raw_dir={root / 'data/raw'}", f"data.prepared_dir={root / 'data/prepared'}",
            "prepare.image_sizes=[48]", "prepare.workers=1", "fetch.progress=false",
        ])
        stages.demo_data(base, params_out=root / "demo-params.yaml")
        params = load_params(root / "demo-params.yaml", [
            f"train.out_dir={root / 'models'}", f"evaluate.out_dir={root / 'evaluation'}",
            f"report.out_dir={root / 'reports'}", f"registry.records_dir={root / 'registry'}",
            "train.models=[demo_tiny]", f"train.datasets=[{DATASET}]", f"train.input_size={SIZE}",
            "train.batch_size=16", "train.head_stage.epochs=1", "train.full_stage.epochs=1", "train.workers=0",
            "train.threads=1", "train.early_stopping_patience=0", "train.device=cpu", "evaluate.batch_size=8",
            "tracking.enabled=false", f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            f"tracking.artifact_location={root / 'mlartifacts'}", f"tracking.experiment=export-{root.name}",
        ])
        params_file = root / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
        stages.fetch(params, [DATASET])
        stages.prepare(params, [DATASET])
        result = stages.train(params, DATASET, MODEL)
        stages.evaluate(params, DATASET, MODEL, [DATASET])
    return root, params_file, params, result.run_dir


@pytest.fixture(scope="module")
def exported(ws, tmp_path_factory):
    """`ferflow export` of the demo run directory, in-process: (file, exit code, stdout)."""
    out = tmp_path_factory.mktemp("export") / "demo.onnx"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", "--model", str(ws[3]), "--format", "onnx", "--out", str(out), "--params", str(ws[1])])
    return out, exit_.value.code or 0


def eval_jpegs(archive: Path, n: int) -> list[bytes]:
    """`n` eval images of an archive, spread over its class folders (sorted names)."""
    with zipfile.ZipFile(archive) as zf:
        names = sorted(m for m in zf.namelist() if "eval" in Path(m).parts[:-1]
                       and Path(m).suffix.lower() in (".jpg", ".jpeg", ".png") and "__MACOSX" not in m)
        step = max(1, len(names) // n)
        return [zf.read(m) for m in names[::step][:n]]


def decoded(pre: Preprocess, images: list[bytes]) -> list[np.ndarray]:
    return [decode_photo(data, pre).arrays[pre.size] for data in images]


def nchw(arrays: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------- export and parity


def test_cli_export_writes_a_checked_graph_with_a_dynamic_batch(exported):
    path, code = exported
    assert code == 0 and path.is_file()
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, SIZE, SIZE]  # a named, free batch axis
    assert out.name == "probabilities" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim][1:] == [3]


def test_onnxruntime_matches_torch_on_demo_images_at_any_batch(ws, exported):
    predictor = inference.load_run(ws[3], torch.device("cpu"))
    onnx_model = export.OnnxPredictor(exported[0])
    arrays = decoded(predictor.preprocess, eval_jpegs(ws[2].data.raw_dir / f"{DATASET}.zip", 24))
    assert len(arrays) == 24
    expected = predictor.probabilities_of_arrays(arrays, batch_size=8)
    got = onnx_model.probabilities_of_arrays(arrays, batch_size=8)
    diff = float(np.abs(got - expected).max())
    print(f"demo_tiny, {len(arrays)} demo eval images: max |p_onnx - p_torch| = {diff:.3g}")
    assert diff <= 1e-4 and np.allclose(got.sum(1), 1.0, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()
    # Dynamic batch: 7 at once gives each image what it gets alone.
    batch = nchw(arrays[:7])
    together = onnx_model.probabilities(batch)
    alone = np.concatenate([onnx_model.probabilities(batch[i:i + 1]) for i in range(7)])
    assert together.shape == (7, 3) and np.abs(together - alone).max() <= 1e-6


def test_metadata_round_trips(ws, exported):
    run_dir, path = ws[3], exported[0]
    predictor = inference.load_run(run_dir, torch.device("cpu"))
    meta = export.read_metadata(path)
    assert meta.preprocess == predictor.preprocess and meta.classes == list(CLASSES) == predictor.classes
    assert meta.model == MODEL and meta.stage == "fine-tuned" and meta.source == str(run_dir)
    assert meta.weights_sha256 == hashlib.sha256((run_dir / "best.safetensors").read_bytes()).hexdigest()
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props == meta.props  # onnx and onnxruntime read the same
    assert props["ferflow.weights_sha256_of"] == "best.safetensors" and props["ferflow.arch"] == zoo.resolve(MODEL).arch
    assert {k: props[k] for k in ("input.layout", "input.dtype", "input.range", "input.channels")} == {
        "input.layout": "NCHW", "input.dtype": "uint8", "input.range": "[0, 255]", "input.channels": "RGB"}
    assert json.loads(props["preprocess.mean"]) == list(predictor.preprocess.mean)
    assert props["preprocess.interpolation"] == "bilinear" and props["preprocess.face_crop"] == "none"


def test_bad_reference_format_and_opset_are_clear_errors(ws, tmp_path, capsys):
    params = ws[2]
    with pytest.raises(FerflowError, match=r"'no-such-model' names no model"):
        export_reference(params, "no-such-model", out=tmp_path / "x.onnx")
    with pytest.raises(FerflowError, match=r"format 'tflite': expected one of onnx"):
        export_reference(params, str(ws[3]), "tflite", out=tmp_path / "x.onnx")
    with pytest.raises(FerflowError, match=r"opset 11: .* 18 or newer"):
        export_reference(params, str(ws[3]), out=tmp_path / "x.onnx", opset=11)
    with pytest.raises(FerflowError, match=r"no registered model named 'absent'"):
        export_reference(params, "models:/absent@champion", out=tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", "--model", str(tmp_path), "--out", str(tmp_path / "y.onnx"), "--params", str(ws[1])])
    assert exit_.value.code == 2 and "not a training run directory" in capsys.readouterr().err
    h = onnx.helper  # a valid ONNX file without ferflow's metadata
    graph = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "plain",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=10), str(tmp_path / "plain.onnx"))
    with pytest.raises(FerflowError, match="not a ferflow export"):
        export.read_metadata(tmp_path / "plain.onnx")
    with pytest.raises(FerflowError, match="not a readable ONNX model"):
        export.read_metadata(tmp_path / "y.onnx.missing")


# ---------------------------------------------------------------------------- architectures


def test_dan_exports_with_its_tuple_output(tmp_path):
    entry = zoo.resolve("dan")
    predictor = inference.Predictor(zoo.build_model(entry, num_classes=3), entry, Preprocess.for_entry(entry, 64),
                                    torch.device("cpu"))
    result = export.export_onnx(predictor, tmp_path / "dan.onnx", source="dan")
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    diff = np.abs(export.OnnxPredictor(result.path).probabilities(images) - predictor.probabilities(images)).max()
    print(f"dan (random init, 64 px): export check {result.max_abs_diff:.3g}, again {diff:.3g}")
    assert diff <= 1e-4 and result.metadata["ferflow.weights_sha256_of"] == "state_dict"
    assert result.metadata["ferflow.weights_sha256"] == tensors_sha256(predictor.model.state_dict().items())


def zero_shot(entry, model: nn.Module, size: int, surprise: str = "ignore") -> inference.Predictor:
    """What `inference.load_zero_shot` builds, from a model in hand."""
    from ferflow.labels import collapse_probs
    from ferflow.labels import source_mapping

    mapping = source_mapping(entry.classes, surprise)
    return inference.Predictor(model, entry, Preprocess.for_entry(entry, size), torch.device("cpu"),
                               info={"model": entry.name, "stage": "zero-shot"},
                               head=lambda m, x: zoo.zero_shot_forward(m, entry, x),
                               collapse=lambda probs: collapse_probs(probs, mapping))


@pytest.mark.parametrize("surprise", ["ignore", "positive"])
def test_zero_shot_class_mapping_is_inside_the_graph(tmp_path, surprise):
    entry = zoo.resolve("fer7_b0_112")  # 7 source classes; Surprise dropped or mapped
    torch.manual_seed(0)
    predictor = zero_shot(entry, zoo.build_model(entry), SIZE, surprise)
    result = export.export_onnx(predictor, tmp_path / "zs.onnx", source=entry.name)
    assert result.metadata["ferflow.stage"] == "zero-shot" and result.max_abs_diff <= 1e-4
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    got = export.OnnxPredictor(result.path).probabilities(images)
    assert got.shape == (4, 3) and np.abs(got - predictor.probabilities(images)).max() <= 1e-4


def test_an_architecture_that_cannot_export_is_named(tmp_path):
    class Spectral(nn.Module):  # linalg_svd has no ONNX function
        def forward(self, x):
            return torch.linalg.svdvals(x.flatten(2))[..., :1].flatten(1).repeat(1, 3)

    entry = types.SimpleNamespace(name="spectral", arch="svd_net")
    predictor = inference.Predictor(Spectral(), entry, Preprocess(8, (0.5,) * 3, (0.5,) * 3), torch.device("cpu"))
    with pytest.raises(FerflowError, match=r"cannot export spectral \(architecture svd_net\) to ONNX: .*svd"):
        export.export_onnx(predictor, tmp_path / "s.onnx")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- stand-in


@pytest.mark.skipif(not (STANDIN.is_file() and (FER7 / "fer7_b0_112.pt").is_file()),
                    reason="../shared stand-in archives and fer7-b0-112 checkpoint not present (CI)")
def test_standin_eval_images_through_the_fer7_checkpoint(tmp_path):
    """The zoo reference path (zero-shot, 112 px EfficientNet-B0) on real FER faces."""
    digest = (FER7 / "SHA256SUMS").read_text().split()[0]
    params = load_params(REPO / "params.yaml", [f"models.fer7_b0_112.pretrained={FER7 / 'fer7_b0_112.pt'}",
                                                f"models.fer7_b0_112.sha256={digest}"])
    result = export_reference(params, "fer7_b0_112", out=tmp_path / "fer7.onnx")
    assert result.metadata["ferflow.weights_sha256"] == digest
    assert result.metadata["ferflow.weights_sha256_of"] == "pretrained checkpoint"
    from ferflow.serving.reference import load_reference

    predictor = load_reference("fer7_b0_112", params, torch.device("cpu"))
    arrays = decoded(predictor.preprocess, eval_jpegs(STANDIN, 48))
    expected = predictor.probabilities_of_arrays(arrays)
    got = export.OnnxPredictor(result.path).probabilities_of_arrays(arrays)
    diff = float(np.abs(got - expected).max())
    print(f"fer7_b0_112 zero-shot, {len(arrays)} stand-in eval images: max |p_onnx - p_torch| = {diff:.3g}")
    assert len(arrays) == 48 and diff <= 1e-4 and (got.argmax(1) == expected.argmax(1)).all()
    assert len(set(expected.argmax(1))) > 1  # a real model on real faces, not a constant


# ---------------------------------------------------------------------------- registry and pyfunc


def test_registered_version_carries_onnx_and_serves_on_onnxruntime(ws, tmp_path):
    from ferflow.tracking import packaging, versioning

    _root, params_file, _params, run_dir = ws
    params = load_params(params_file, ["serve.engine=onnx", f"registry.names.{DATASET}=export-{uuid.uuid4().hex[:8]}"])
    version = versioning.register(params, DATASET, run_dir)
    tags = version.tags
    assert tags[packaging.ENGINE_TAG] == "onnx" and tags[packaging.ONNX_PATH_TAG] == "artifacts/model.onnx"
    assert "| ONNX | `artifacts/model.onnx`" in version.description
    uri = f"models:/{version.name}/{version.version}"
    local = mlflow.artifacts.download_artifacts(f"{uri}/artifacts/model.onnx", dst_path=str(tmp_path))
    assert hashlib.sha256(Path(local).read_bytes()).hexdigest() == tags[packaging.ONNX_SHA_TAG]
    assert export.read_metadata(local).source.startswith("runs:/")

    images = eval_jpegs(params.data.raw_dir / f"{DATASET}.zip", 12)
    frame = pd.DataFrame({"image": [base64.b64encode(b).decode("ascii") for b in images]})
    served = mlflow.pyfunc.load_model(uri)
    assert isinstance(served.unwrap_python_model().predictor, export.OnnxPredictor)
    got = served.predict(frame)[[f"p_{c}" for c in CLASSES]].to_numpy()
    torch_predictor = inference.load_run(run_dir, torch.device("cpu"))
    expected = torch_predictor.probabilities_of_arrays(decoded(torch_predictor.preprocess, images))
    diff = float(np.abs(got - expected).max())
    print(f"pyfunc engine onnx vs torch Predictor, {len(images)} demo images: max diff {diff:.3g}")
    assert diff <= 1e-4
    # The engine is the model's config: loading can ask for torch instead.
    as_torch = mlflow.pyfunc.load_model(uri, model_config={"engine": "torch"})
    assert isinstance(as_torch.unwrap_python_model().predictor, inference.Predictor)
    assert np.abs(as_torch.predict(frame)[[f"p_{c}" for c in CLASSES]].to_numpy() - expected).max() <= 1e-6


def test_an_export_failure_stops_registration_before_the_model_is_logged(ws, monkeypatch):
    from mlflow import MlflowClient

    from ferflow.tracking import queries, versioning

    def refuse(predictor, *args, **kwargs):
        raise FerflowError(f"cannot export {predictor.entry.name} (architecture x) to ONNX: no ONNX function")

    monkeypatch.setattr(export, "export_onnx", refuse)
    params = load_params(ws[1], [f"registry.names.{DATASET}=refused-{uuid.uuid4().hex[:8]}"])
    with pytest.raises(FerflowError, match=r"not registered, every version carries its model.onnx: cannot export"):
        versioning.register(params, DATASET, ws[3])
    assert queries.versions(MlflowClient(), params.registry.name_for(DATASET)) == []


def test_serve_engine_is_validated(ws):
    assert load_params(ws[1], ["serve.engine=onnx"]).serve.engine == "onnx"
    with pytest.raises(FerflowError, match="serve.engine"):
        load_params(ws[1], ["serve.engine=tflite"])
