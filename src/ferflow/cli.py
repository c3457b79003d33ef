"""`ferflow`: one subcommand per pipeline stage. Each reads params.yaml (or --params) plus
--set overrides, and calls the same stage function that dvc.yaml and the KFP components use.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ferflow import __version__, stages
from ferflow.config import Params, load_params
from ferflow.errors import ConfigError, FerflowError
from ferflow.redact import install_log_filter, redact_text
from ferflow.pipeline.cli import pipeline_app

app = typer.Typer(
    name="ferflow",
    help="Facial-expression recognition under face masks: fetch, prepare, train, evaluate, track.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="params file (YAML)", show_default=True)
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="override a key: --set fetch.retries=2 (repeatable)"),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show tracebacks and debug logs")]
DatasetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--dataset", "-d", help="archive name from data.archives (repeatable; default: all)"),
]

_state = {"verbose": False}


def _load(params: Path, overrides: Optional[list[str]], verbose: bool) -> Params:
    if verbose:
        _state["verbose"] = True
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
        install_log_filter()  # debug lines of urllib3 & co. carry query strings
    return load_params(params, overrides or [])


def _version(value: bool) -> None:
    if value:
        out.print(f"ferflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: VerboseOpt = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    _state["verbose"] = verbose


@app.command()
def fetch(
    dataset: DatasetOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    dvc_lock: Annotated[Path, typer.Option(help="dvc.lock whose fetch@ entries pin archives by md5 "
                                                "(absent: no pins)")] = Path("dvc.lock"),
    dvc_remote: Annotated[str, typer.Option(help="DVC remote URL to fetch pinned archives from by md5 "
                                                 "(default: their params URI)")] = "",
    verbose: VerboseOpt = False,
) -> None:
    """Download the archives in data.archives into data.raw_dir, verified by sha256 and by
    the md5 dvc.lock pins (the same fetch as the KFP fetch task)."""
    cfg = _load(params, set_, verbose)
    results = stages.fetch(cfg, dataset, dvc_lock=dvc_lock, dvc_remote=dvc_remote)
    table = Table("archive", "bytes", "sha256", "action")
    for r in results:
        action = "downloaded" + (" (DVC remote)" if r.from_dvc_remote else "") if r.downloaded else "verified, reused"
        table.add_row(r.name, f"{r.size:,}", r.sha256[:16] + "…", action)
    out.print(table)


@app.command()
def prepare(
    dataset: DatasetOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Extract safely, validate images, write manifest + report + uint8 caches per dataset."""
    cfg = _load(params, set_, verbose)
    results = stages.prepare(cfg, dataset)
    table = Table("dataset", "images", "quarantined", "images/s", "output")
    for r in results:
        table.add_row(r.dataset, str(r.n_images), str(r.n_quarantined), f"{r.images_per_s:,.0f}", str(r.out_dir))
    out.print(table)


@app.command("demo-data")
def demo_data(
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", help="directory for the archives (default: demo.out_dir)")
    ] = None,
    params_out: Annotated[
        Optional[Path],
        typer.Option("--params-out", help="also write a params file whose data.archives use the demo archives"),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Generate three small offline demo archives (faces / masked / masked face-cut)."""
    cfg = _load(params, set_, verbose)
    archives = stages.demo_data(cfg, out_dir, params_out)
    table = Table("archive", "images", "bytes", "sha256")
    for a in archives:
        table.add_row(str(a.path), str(a.n_images), f"{a.size:,}", a.sha256)
    out.print(table)
    if params_out is not None:
        out.print(f"params using them: {params_out}")


def _names(values: Optional[list[str]]) -> list[str]:
    """Repeatable options that also take comma lists: --style surgical,cloth --style n95."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


@app.command("synthesize-masks")
def synthesize_masks(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="archive name from data.archives (fetched)")],
    out_zip: Annotated[Path, typer.Option("--out", help="masked archive to write (FILE.zip; face-cut: FILE-face-cut.zip)")],
    style: Annotated[Optional[list[str]], typer.Option(
        "--style", help="surgical, cloth, n95, kn95 (repeatable or comma list; default: all)")] = None,
    colour: Annotated[Optional[list[str]], typer.Option(
        "--colour", help="plain, dark, coloured, patterned (repeatable or comma list; default: all)")] = None,
    seed: Annotated[int, typer.Option("--seed", help="same seed, same masks")] = 0,
    placement: Annotated[str, typer.Option(
        "--placement", help="auto (detector landmarks when prepare.detector is set, else geometry), landmarks, "
        "geometry")] = "auto",
    face_box: Annotated[str, typer.Option(
        "--face-box", help="where faces are when no landmarks are found: x0,y0,x1,y1 as fractions of the image")]
    = "0,0,1,1",
    face_cut: Annotated[bool, typer.Option("--face-cut/--no-face-cut", help="also write the face-cut variant")] = True,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Draw synthetic face masks on every image of an archive (masked and face-cut archives)."""
    cfg = _load(params, set_, verbose)
    try:
        box = tuple(float(v) for v in face_box.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise ConfigError(f"--face-box {face_box!r}: expected x0,y0,x1,y1 with 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1")
    try:
        result = stages.synthesize_masks(cfg, dataset, out_zip, _names(style), _names(colour), seed, placement, box,
                                         face_cut)
    except ValueError as exc:  # unknown style or colour names
        raise ConfigError(str(exc)) from None
    table = Table("archive", "images", "sha256")
    for path, digest in result.sha256().items():
        table.add_row(path, str(result.n_images), digest)
    out.print(table)
    out.print("mask placement: " + ", ".join(f"{k} {v}" for k, v in sorted(result.placement.items()))
              + (f"; {len(result.skipped)} undecodable image(s) skipped" if result.skipped else ""))


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="zoo name (see `ferflow models`) or timm:<arch>")]
OneDatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="archive name from data.archives")]


@app.command()
def train(
    dataset: OneDatasetOpt,
    model: ModelOpt,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Fine-tune a model on a prepared dataset (head, then all layers); resumes a killed run."""
    cfg = _load(params, set_, verbose)
    result = stages.train(cfg, dataset, model)
    best = ", ".join(f"{k} {v:.4f}" for k, v in result.best_metrics.items() if isinstance(v, float))
    out.print(f"best epoch {result.best_epoch}: {best}")
    out.print(f"run directory: {result.run_dir}")
    if cfg.tracking.enabled:
        from ferflow.tracking.rundir import read_run_ref

        ref = read_run_ref(result.run_dir)
        if ref:
            out.print(f"MLflow run: {ref['run_id']} ({ref.get('run_name')}) at {ref.get('tracking_uri')}")


@app.command()
def evaluate(
    model: ModelOpt,
    dataset: Annotated[
        Optional[str], typer.Option("--dataset", "-d", help="the dataset the model was fine-tuned on")
    ] = None,
    on: Annotated[
        Optional[list[str]], typer.Option("--on", help="eval datasets (repeatable; default: all archives)")
    ] = None,
    zero_shot: Annotated[
        bool, typer.Option("--zero-shot", help="evaluate the pretrained head mapped to 3 classes instead")
    ] = False,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Evaluate a fine-tuned run on the eval split of each dataset (cross-dataset matrix)."""
    cfg = _load(params, set_, verbose)
    if not zero_shot and dataset is None:
        raise ConfigError("ferflow evaluate: --dataset is required (the dataset the model was fine-tuned on)")
    summary = stages.zero_shot(cfg, model, on) if zero_shot else stages.evaluate(cfg, dataset, model, on)
    if not summary:
        out.print(f"{model}: nothing to evaluate zero-shot (no pretrained expression head or weights)")
        return
    table = Table("evaluated on", "accuracy", "macro-F1", "images")
    started = any("baseline_accuracy" in m for m in summary.values())
    if started:  # the fine-tuned model beside the checkpoint it started from, zero-shot
        table = Table("evaluated on", "accuracy", "macro-F1", "zero-shot start", "Δ accuracy", "images")
    for name, m in summary.items():
        cells = [f"{100 * m['accuracy']:.2f} %", f"{m['macro_f1']:.4f}"]
        if started:
            start = m.get("baseline_accuracy")
            cells += ["–", "–"] if start is None else [f"{100 * start:.2f} %", f"{100 * (m['accuracy'] - start):+.2f}"]
        table.add_row(name, *cells, str(m["n"]))
    out.print(table)


@app.command()
def register(
    dataset: OneDatasetOpt,
    model: ModelOpt,
    run_dir: Annotated[
        Optional[Path], typer.Option("--run-dir", help="a trained run directory (default: train.out_dir/DATASET/MODEL)")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Log the fine-tuned model to MLflow and register a new version with alias `challenger`."""
    cfg = _load(params, set_, verbose)
    version = stages.register(cfg, dataset, model, run_dir)
    out.print(f"registered {version.name} version {version.version} (alias challenger)")


@app.command()
def promote(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="dataset whose registered model to promote")],
    metric: Annotated[Optional[str], typer.Option("--metric", help="gate metric (default: registry.metric)")] = None,
    min_delta: Annotated[
        Optional[float], typer.Option("--min-delta", help="required improvement (default: registry.min_delta)")
    ] = None,
    rollback: Annotated[bool, typer.Option("--rollback", help="swap champion and previous-champion back")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="promote the challenger even if it loses to the champion or to its zero-shot start")] = False,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Move `champion` to the best challenger if it beats the champion on the same eval data
    and is not below the zero-shot accuracy of the checkpoint it was fine-tuned from."""
    cfg = _load(params, set_, verbose)
    decision = stages.promote(cfg, dataset, metric, min_delta, rollback, force)
    out.print(f"{decision.name}: {decision.action} — {decision.reason}")
    for key, value in decision.as_dict().items():
        if value is not None and key not in ("name", "action", "reason"):
            out.print(f"  {key}: {value}")


@app.command()
def report(
    from_registry: Annotated[
        bool, typer.Option("--from-registry", help="read results from the MLflow registry, not local files")
    ] = False,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Write the models x datasets accuracy table (Markdown + CSV) beside the seed's numbers."""
    cfg = _load(params, set_, verbose)
    _results, paths = stages.report(cfg, from_registry=from_registry)
    out.print(paths["markdown"].read_text())
    out.print(f"written: {paths['markdown']} and {paths['csv']}")


@app.command()
def models(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """List the model zoo with input sizes, heads and the weights params select."""
    from ferflow.models.zoo import ZOO

    cfg = _load(params, set_, verbose)
    table = Table("name", "architecture", "input", "head", "classes", "pretrained")
    for name, e in ZOO.items():
        table.add_row(name, e.arch, str(e.input_size), e.head, str(len(e.classes) or "-"),
                      cfg.weights_for(name).pretrained)
    out.print(table)
    out.print("any timm architecture: timm:<name>, e.g. timm:tf_efficientnet_b0")


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(metavar="PATH", help="image files or folders (searched recursively)")],
    model: Annotated[str, typer.Option("--model", "-m", help="models:/<name>@<alias>, models:/<name>/<version>, "
                                       "a run directory, or a zoo name (zero-shot)")],
    out_file: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="FILE.csv or FILE.json (with the skipped files); default: CSV on stdout")] = None,
    annotate: Annotated[Optional[Path], typer.Option(
        "--annotate", help="write a copy of each image with its box and label into this folder")] = None,
    face_crop: Annotated[Optional[str], typer.Option(
        "--face-crop", help="none | center:<f> | detect | detect:<f> (default: what the model was trained with)")]
    = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="images per forward pass")] = 32,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Predict negative / neutral / positive for photos with a trained, registered or zoo model."""
    from ferflow.serving.predict import run

    cfg = _load(params, set_, verbose)
    result = run(paths, model, cfg, out_file, annotate, face_crop, batch_size, console=console)
    console.print(f"{len(result.predictions)} image(s) predicted, {len(result.skipped)} skipped"
                  + (f"; written to {out_file}" if out_file else "")
                  + (f"; annotated copies in {annotate}" if annotate else ""), markup=False, highlight=False,
                  soft_wrap=True)


@app.command()
def export(
    model: Annotated[str, typer.Option("--model", "-m", help="models:/<name>@<alias>, models:/<name>/<version>, "
                                       "a run directory, or a zoo name (zero-shot)")],
    format_: Annotated[str, typer.Option("--format", "-f", help="onnx")] = "onnx",
    out_file: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="the file to write (default: ./<reference>.onnx)")] = None,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset, >= 18 (default: the exporter's)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Export a model as ONNX: uint8 RGB NCHW images in (normalisation inside, any batch),
    3-class probabilities out; checked against torch with onnxruntime before it is written."""
    import json

    from ferflow.serving.export import export as export_model

    cfg = _load(params, set_, verbose)
    result = export_model(cfg, model, format_, out_file, opset)
    meta, size = result.metadata, result.metadata["preprocess.size"]
    for line in (f"wrote {result.path} (opset {result.opset}, sha256 {result.sha256})",
                 f"  input {meta['input.name']}: uint8 (batch, 3, {size}, {size}) RGB 0..255, normalised inside; "
                 f"output {meta['output.name']}: {', '.join(json.loads(meta['ferflow.classes']))}",
                 f"  onnxruntime vs torch: max |probability difference| {result.max_abs_diff:.2e}"):
        out.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command(
    "parent-run",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def parent_run_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="MLflow run name of the DAG invocation")] = "dag",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a command (e.g. `dvc repro`) under one MLflow parent run: `ferflow parent-run -- dvc repro`.

    Training runs started by the command nest under it (FERFLOW_PARENT_RUN_ID).
    """
    import subprocess

    from ferflow.tracking.parent_runs import parent_run

    cfg = _load(params, set_, verbose)
    if not ctx.args:
        raise ConfigError("ferflow parent-run: give the command to run after --, e.g. -- dvc repro")
    if not cfg.tracking.enabled:
        raise typer.Exit(subprocess.call(ctx.args))
    with parent_run(cfg, name) as run_id:
        out.print(f"MLflow parent run {run_id} ({name})")
        code = subprocess.call(ctx.args)
        if code:
            raise FerflowError(f"{' '.join(ctx.args)} exited with {code}")
    raise typer.Exit(0)


app.add_typer(pipeline_app, name="pipeline")

from ferflow.serving.kserve import serve_app  # noqa: E402 - imports nothing heavy (typer only)

app.add_typer(serve_app, name="serve")


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit."""
    install_log_filter()
    try:
        app(args=argv)  # click's standalone mode handles usage errors and exits itself
    except FerflowError as exc:
        if _state["verbose"]:
            console.print(redact_text(traceback.format_exc()), highlight=False, markup=False)
        console.print(f"[bold red]error:[/] {escape(redact_text(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
