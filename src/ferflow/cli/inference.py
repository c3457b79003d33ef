"""The commands that use a model outside the pipeline: list the zoo, predict photos, and
export a model as ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ferflow.commandline import err, out, params_loader
from ferflow.config import Params

app = typer.Typer()  # merged into `ferflow` (ferflow.cli)

ReferenceOpt = Annotated[str, typer.Option("--model", "-m", help="models:/<name>@<alias>, models:/<name>/<version>, "
                                           "a run directory, or a zoo name (zero-shot)")]


@app.command()
@params_loader(example="models.dan.pretrained=weights/dan.pth")
def models(*, cfg: Params) -> None:
    """List the model zoo with input sizes, heads and the weights params select."""
    from ferflow.models.zoo import ZOO

    table = Table("name", "architecture", "input", "head", "classes", "pretrained")
    for name, e in ZOO.items():
        table.add_row(name, e.arch, str(e.input_size), e.head, str(len(e.classes) or "-"),
                      cfg.weights_for(name).pretrained)
    out.print(table)
    out.print("any timm architecture: timm:<name>, e.g. timm:tf_efficientnet_b0")


@app.command()
@params_loader(example="train.device=cpu")
def predict(
    paths: Annotated[list[Path], typer.Argument(metavar="PATH", help="image files or folders (searched recursively)")],
    model: ReferenceOpt,
    out_file: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="FILE.csv or FILE.json (with the skipped files); default: CSV on stdout")] = None,
    annotate: Annotated[Optional[Path], typer.Option(
        "--annotate", help="write a copy of each image with its box and label into this folder")] = None,
    face_crop: Annotated[Optional[str], typer.Option(
        "--face-crop", help="none | center:<f> | detect | detect:<f> (default: what the model was trained with)")]
    = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="images per forward pass")] = 32,
    *,
    cfg: Params,
) -> None:
    """Predict negative / neutral / positive for photos with a trained, registered or zoo model."""
    from ferflow.serving.predict import run

    result = run(paths, model, cfg, out_file, annotate, face_crop, batch_size, console=err)
    err.print(f"{len(result.predictions)} image(s) predicted, {len(result.skipped)} skipped"
              + (f"; written to {out_file}" if out_file else "")
              + (f"; annotated copies in {annotate}" if annotate else ""), markup=False, highlight=False,
              soft_wrap=True)


@app.command()
@params_loader(example="models.enet_b0_7.pretrained=weights/enet_b0_7.pt")
def export(
    model: ReferenceOpt,
    format_: Annotated[str, typer.Option("--format", "-f", help="onnx")] = "onnx",
    out_file: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="the file to write (default: ./<reference>.onnx)")] = None,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset, >= 18 (default: the exporter's)")] = None,
    *,
    cfg: Params,
) -> None:
    """Export a model as ONNX: uint8 RGB NCHW images in (normalisation inside, any batch),
    3-class probabilities out; checked against torch with onnxruntime before it is written."""
    import json

    from ferflow.serving.reference import export_reference as export_model

    result = export_model(cfg, model, format_, out_file, opset)
    meta, size = result.metadata, result.metadata["preprocess.size"]
    for line in (f"wrote {result.path} (opset {result.opset}, sha256 {result.sha256})",
                 f"  input {meta['input.name']}: uint8 (batch, 3, {size}, {size}) RGB 0..255, normalised inside; "
                 f"output {meta['output.name']}: {', '.join(json.loads(meta['ferflow.classes']))}",
                 f"  onnxruntime vs torch: max |probability difference| {result.max_abs_diff:.2e}"):
        out.print(line, markup=False, highlight=False, soft_wrap=True)
