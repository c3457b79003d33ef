"""ONNX export of a Predictor: one self-contained file, verified against torch.

The graph is everything `Predictor.probabilities` does after decoding, so a consumer only
has to decode, crop and resize (the recorded preprocessing) and never re-implements the
normalisation, the DAN tuple unwrap or the zero-shot class mapping:

    input   `image`          uint8 (batch, 3, S, S), RGB, 0..255, NCHW; batch is dynamic
    inside  (x / 255 - mean) / std (one Mul + Add), the network, softmax, and for a
            zero-shot model the mapping of its head's classes onto the 3 classes
    output  `probabilities`  float32 (batch, 3), rows sum to 1, in `ferflow.classes` order

Logits are not exported: a zero-shot model has none over the 3 classes (its probabilities
are summed per class), and one output with one meaning serves both kinds of model.

`metadata_props` (all strings; lists and numbers as JSON):

    ferflow.format             "1": the version of this key set
    ferflow.version            ferflow that exported it
    ferflow.model, .arch       the zoo model and its architecture
    ferflow.stage              fine-tuned | zero-shot
    ferflow.classes            the output's class order, e.g. ["negative", "neutral", "positive"]
    ferflow.source             the reference exported (models:/..., a run directory, a zoo name)
    ferflow.registered_version <name>/<version>, when the reference is a registered model
    ferflow.weights_sha256     sha256 of ferflow.weights_sha256_of:
    ferflow.weights_sha256_of  best.safetensors | pretrained checkpoint | state_dict (the
                               model's tensors in name order, when no file is known)
    preprocess.size, .mean, .std, .interpolation, .face_crop, .face_margin
                               `ferflow.models.preprocess.Preprocess`: decode to RGB, crop,
                               resize square to size (mean/std are applied inside the graph)
    input.name, .layout, .dtype, .range, .channels, .normalized_inside
    output.name, .kind

`read_metadata` reads them back; `OnnxPredictor` runs the file on onnxruntime with the
Predictor's interface (the pyfunc's `serve.engine: onnx`).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ferflow import layout
from ferflow.errors import FerflowError
from ferflow.fileio import atomic_path, sha256_file
from ferflow.models.weights import tensors_sha256
from ferflow.models.inference import Predictor, forward
from ferflow.models.preprocess import Preprocess

FORMATS = ("onnx",)
FORMAT_VERSION = "1"
INPUT, OUTPUT = "image", "probabilities"
TOLERANCE = 1e-4  # max |p_onnx - p_torch| accepted by the check after export
CHECK_BATCHES = (1, 5)  # two batch sizes: the dynamic axis is exercised too
# The dynamo exporter traces through process-wide state: concurrent exports (two
# registrations in threads) must take turns.
_EXPORT_LOCK = threading.Lock()


@dataclass(frozen=True)
class Exported:
    path: Path
    sha256: str
    opset: int
    max_abs_diff: float  # onnxruntime vs torch on the check inputs
    metadata: dict


@dataclass(frozen=True)
class ExportMetadata:
    preprocess: Preprocess
    classes: list
    model: str
    stage: str
    source: str
    weights_sha256: str
    props: dict  # every metadata_props entry, as stored


# ---------------------------------------------------------------------------- graph


class _ProbabilityGraph(nn.Module):
    """uint8 NCHW -> class probabilities: what Predictor.probabilities computes."""

    def __init__(self, predictor: Predictor, mapping: Optional[Tensor]):
        super().__init__()
        self.model, self.head = predictor.model, predictor.head
        norm = predictor.normalize
        self.register_buffer("scale", norm.scale.detach().float().cpu().clone())
        self.register_buffer("shift", norm.shift.detach().float().cpu().clone())
        self.register_buffer("mapping", mapping if mapping is not None else torch.zeros(0))
        self.collapse = mapping is not None

    def forward(self, image: Tensor) -> Tensor:
        x = torch.addcmul(self.shift, image.to(torch.float32), self.scale)
        logits = self.head(self.model, x) if self.head is not None else forward(self.model, x)[0]
        probs = torch.softmax(logits.float(), dim=1)
        if not self.collapse:
            return probs
        # collapse_probs: sum per target class, renormalise; no mass left -> uniform.
        out = probs @ self.mapping
        total = out.sum(dim=1, keepdim=True)
        uniform = torch.full_like(out, 1.0 / out.shape[1])
        return torch.where(total > 0, out / total.clamp_min(1e-30), uniform)


def _mapping_matrix(predictor: Predictor, n_source: int) -> Optional[Tensor]:
    """The zero-shot collapse as a (source, 3) 0/1 matrix, read off the collapse itself and
    checked on random probabilities: a collapse that is not a class mapping cannot export."""
    if predictor.collapse is None:
        return None
    n_out = len(predictor.classes)
    rows = np.asarray(predictor.collapse(np.eye(n_source)), dtype=np.float64)
    matrix = np.zeros((n_source, n_out))
    for i, row in enumerate(rows):
        if np.isclose(row.max(), 1.0) and np.isclose(row.sum(), 1.0):
            matrix[i, int(row.argmax())] = 1.0  # mapped; a dropped class gives a uniform row
    probe = np.random.default_rng(0).dirichlet(np.ones(n_source), size=64)
    expected = np.asarray(predictor.collapse(probe), dtype=np.float64)
    summed = probe @ matrix
    got = summed / np.maximum(summed.sum(1, keepdims=True), 1e-300)
    if not np.allclose(got, expected, atol=1e-9):
        raise FerflowError(f"model {predictor.entry.name}: its zero-shot class mapping is not a sum of source "
                           "classes; it cannot be exported to ONNX")
    return torch.tensor(matrix, dtype=torch.float32)


def _on_cpu(predictor: Predictor) -> Predictor:
    """Export and check on CPU: CUDA's TF32 convolutions would blur the parity check."""
    if predictor.device.type == "cpu":
        return predictor
    return Predictor(copy.deepcopy(predictor.model).cpu(), predictor.entry, predictor.preprocess,
                     torch.device("cpu"), info=predictor.info, head=predictor.head, collapse=predictor.collapse,
                     classes=predictor.classes)


# ---------------------------------------------------------------------------- export


def export_onnx(predictor: Predictor, out: Path, *, source: str = "", weights_sha256: Optional[str] = None,
                weights_of: str = layout.WEIGHTS, opset: Optional[int] = None,
                tolerance: float = TOLERANCE, extra_metadata: Optional[dict] = None) -> Exported:
    """Write `predictor` as ONNX to `out` (replaced atomically), checked by onnx.checker and
    by onnxruntime against torch on random images; a gap above `tolerance` is an error.
    `weights_sha256` (of `weights_of`) defaults to a digest of the model's tensors."""
    import onnx

    predictor = _on_cpu(predictor)
    out = Path(out)
    size = predictor.preprocess.size
    probe = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = predictor.inputs(probe)
        n_source = (predictor.head(predictor.model, x) if predictor.head is not None
                    else forward(predictor.model, x)[0]).shape[1]
    graph = _ProbabilityGraph(predictor, _mapping_matrix(predictor, n_source)).eval()
    name = f"{predictor.entry.name} (architecture {predictor.entry.arch})"
    with _EXPORT_LOCK, torch.no_grad():
        try:
            program = torch.onnx.export(
                graph, (probe,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT], opset_version=opset,
                dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}}, verbose=False)
            proto = program.model_proto
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types; one clear error
            raise FerflowError(f"cannot export {name} to ONNX{f' opset {opset}' if opset else ''}: "
                               f"{_first_line(exc)}") from exc
    if weights_sha256 is None:
        weights_sha256, weights_of = tensors_sha256(predictor.model.state_dict().items()), "state_dict"
    props = {**_metadata(predictor, source, weights_sha256, weights_of), **(extra_metadata or {})}
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = (f"ferflow {predictor.entry.name}: uint8 RGB NCHW images at {size} px (0..255; "
                        f"normalisation inside) -> softmax probabilities over {', '.join(predictor.classes)}")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise FerflowError(f"the ONNX graph of {name} fails onnx.checker: {_first_line(exc)}") from exc
    with atomic_path(out, suffix=".onnx") as tmp:  # checked before it takes the name
        onnx.save_model(proto, str(tmp))
        diff = check_parity(predictor, tmp, tolerance)
    opset_used = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return Exported(out, sha256_file(out), int(opset_used), diff, props)


def check_parity(predictor: Predictor, path: Path, tolerance: float = TOLERANCE,
                 batches: Sequence[int] = CHECK_BATCHES, seed: int = 1) -> float:
    """Max |p_onnxruntime - p_torch| over random uint8 images in `batches`; above
    `tolerance` raises (a silently different exported model is worse than none)."""
    session = OnnxPredictor(path)
    size, generator = predictor.preprocess.size, torch.Generator().manual_seed(seed)
    worst = 0.0
    for n in batches:
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
        worst = max(worst, float(np.abs(session.probabilities(images) - predictor.probabilities(images)).max()))
    if not worst <= tolerance:  # NaN fails too
        raise FerflowError(f"ONNX export of {predictor.entry.name} differs from torch: max |probability difference| "
                           f"{worst:.3g} > {tolerance:g} on random images (batches {list(batches)}); not written")
    return worst


def _metadata(predictor: Predictor, source: str, weights_sha256: str, weights_of: str) -> dict:
    from ferflow import __version__

    pre = predictor.preprocess
    return {
        "ferflow.format": FORMAT_VERSION, "ferflow.version": __version__,
        "ferflow.model": predictor.entry.name, "ferflow.arch": str(predictor.entry.arch),
        "ferflow.stage": layout.ZERO_SHOT if predictor.collapse is not None else layout.FINE_TUNED,
        "ferflow.classes": json.dumps(list(predictor.classes)), "ferflow.source": str(source),
        "ferflow.weights_sha256": weights_sha256, "ferflow.weights_sha256_of": weights_of,
        "preprocess.size": str(pre.size), "preprocess.mean": json.dumps(list(pre.mean)),
        "preprocess.std": json.dumps(list(pre.std)), "preprocess.interpolation": pre.interpolation,
        "preprocess.face_crop": pre.face_crop, "preprocess.face_margin": json.dumps(pre.face_margin),
        "input.name": INPUT, "input.layout": "NCHW", "input.dtype": "uint8", "input.range": "[0, 255]",
        "input.channels": "RGB", "input.normalized_inside": "true",
        "output.name": OUTPUT, "output.kind": "softmax probabilities (float32, rows sum to 1)",
    }


def read_metadata(path: Union[Path, str]) -> ExportMetadata:
    """The ferflow metadata of an exported file (onnxruntime only: no onnx needed to serve)."""
    import onnxruntime as ort

    try:
        props = dict(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                     .get_modelmeta().custom_metadata_map)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
        raise FerflowError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from exc
    return _parse(props, path)


def _parse(props: dict, path) -> ExportMetadata:
    if props.get("ferflow.format") != FORMAT_VERSION:
        raise FerflowError(f"{path}: not a ferflow export (metadata ferflow.format is "
                           f"{props.get('ferflow.format')!r}, expected {FORMAT_VERSION!r})")
    try:
        pre = Preprocess(int(props["preprocess.size"]), tuple(json.loads(props["preprocess.mean"])),
                         tuple(json.loads(props["preprocess.std"])), props["preprocess.interpolation"],
                         props["preprocess.face_crop"], float(json.loads(props["preprocess.face_margin"])))
        return ExportMetadata(pre, list(json.loads(props["ferflow.classes"])), props["ferflow.model"],
                              props["ferflow.stage"], props["ferflow.source"], props["ferflow.weights_sha256"], props)
    except (KeyError, ValueError, TypeError) as exc:
        raise FerflowError(f"{path}: incomplete ferflow metadata ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------- onnxruntime


class OnnxPredictor:
    """An exported file on onnxruntime with Predictor's interface: uint8 NCHW batches ->
    float64 probabilities over `classes`, preprocessing from the file's metadata."""

    def __init__(self, path: Union[Path, str], threads: Optional[int] = None):
        import onnxruntime as ort

        from ferflow.cpus import available_cpus

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cpus()  # the pod's CPUs, not the node's
        # CUDA first when onnxruntime-gpu is installed; the CPU package offers CPU only.
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001
            raise FerflowError(f"{path}: onnxruntime cannot load it ({_first_line(exc)})") from exc
        meta = _parse(dict(self.session.get_modelmeta().custom_metadata_map), path)
        self.path, self.metadata = Path(path), meta
        self.preprocess, self.classes, self.info = meta.preprocess, meta.classes, meta.props

    def probabilities(self, batch: Union[Tensor, np.ndarray]) -> np.ndarray:
        array = batch.cpu().numpy() if isinstance(batch, Tensor) else np.asarray(batch)
        if array.dtype != np.uint8:
            raise FerflowError(f"{self.path.name} takes uint8 images (0..255), got {array.dtype}")
        (probs,) = self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(array)})
        return probs.astype(np.float64)

    def probabilities_of_arrays(self, arrays: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """uint8 HWC images at the input size (what ferflow.data.decode.decode_photo gives)."""
        out = [self.probabilities(np.stack(arrays[i:i + batch_size]).transpose(0, 3, 1, 2))
               for i in range(0, len(arrays), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))


def _first_line(exc: BaseException) -> str:
    """The root cause's first line: the exporter wraps the useful part (which op has no
    ONNX function) in generic "next steps" text with colour codes."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip() or type(exc).__name__
    return " ".join(text.splitlines()[0].split())[:400]
