"""The model stages: train, evaluate (fine-tuned or zero-shot), register in MLflow, promote
to champion, and the accuracy report across models and datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ferflow import stages
from ferflow.commandline import out, params_loader
from ferflow.config import Params
from ferflow.errors import ConfigError

app = typer.Typer()  # merged into `ferflow` (ferflow.cli)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="zoo name (see `ferflow models`) or timm:<arch>")]
OneDatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="archive name from data.archives")]


@app.command()
@params_loader(example="train.full_stage.epochs=3")
def train(dataset: OneDatasetOpt, model: ModelOpt, *, cfg: Params) -> None:
    """Fine-tune a model on a prepared dataset (head, then all layers); resumes a killed run."""
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
@params_loader(example="evaluate.batch_size=128")
def evaluate(
    model: ModelOpt,
    dataset: Annotated[
        Optional[str], typer.Option("--dataset", "-d", help="the dataset the model was fine-tuned on")
    ] = None,
    on: Annotated[
        Optional[list[str]],
        typer.Option("--on", help="eval datasets (repeatable; default: every archive prepared at the model's "
                                  "size, naming those skipped)"),
    ] = None,
    zero_shot: Annotated[
        bool, typer.Option("--zero-shot", help="evaluate the pretrained head mapped to 3 classes instead")
    ] = False,
    *,
    cfg: Params,
) -> None:
    """Evaluate a fine-tuned run on the eval split of each dataset (cross-dataset matrix)."""
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
@params_loader(example="registry.names.LFW-FER=ferflow-faces")
def register(
    dataset: OneDatasetOpt,
    model: ModelOpt,
    run_dir: Annotated[
        Optional[Path], typer.Option("--run-dir", help="a trained run directory (default: train.out_dir/DATASET/MODEL)")
    ] = None,
    *,
    cfg: Params,
) -> None:
    """Log the fine-tuned model to MLflow and register a new version with alias `challenger`.

    The same run, weights and eval data again register nothing: it names the version that
    already holds them, and the aliases that version holds now."""
    version = stages.register(cfg, dataset, model, run_dir)
    aliases = sorted(version.aliases or [])
    held = f"alias{'es' * (len(aliases) > 1)} {', '.join(aliases)}" if aliases else "no alias"
    if version.created:
        out.print(f"registered {version.name} version {version.version} ({held})")
    else:  # the same run, weights and eval data: nothing new, and it keeps what it holds
        last = version.tags.get("promotion.decision")
        out.print(f"{version.name}: already registered as version {version.version} ({held}"
                  + (f"; last promotion decision: {last}" if last else "") + "); nothing new registered")


@app.command()
@params_loader(example="registry.min_delta=0.005")
def promote(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="dataset whose registered model to promote")],
    metric: Annotated[Optional[str], typer.Option("--metric", help="gate metric (default: registry.metric)")] = None,
    min_delta: Annotated[
        Optional[float], typer.Option("--min-delta", help="required improvement (default: registry.min_delta)")
    ] = None,
    rollback: Annotated[bool, typer.Option("--rollback", help="swap champion and previous-champion back")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="promote the challenger even if it loses to the champion or to its zero-shot start")] = False,
    *,
    cfg: Params,
) -> None:
    """Move `champion` to the best challenger if it beats the champion on the same eval data
    and is not below the zero-shot accuracy of the checkpoint it was fine-tuned from."""
    decision = stages.promote(cfg, dataset, metric, min_delta, rollback, force)
    out.print(f"{decision.name}: {decision.action} — {decision.reason}")
    for key, value in decision.as_dict().items():
        if value is not None and key not in ("name", "action", "reason"):
            out.print(f"  {key}: {value}")


@app.command()
@params_loader(example="report.out_dir=reports/v2")
def report(
    from_registry: Annotated[
        bool, typer.Option("--from-registry", help="read results from the MLflow registry, not local files")
    ] = False,
    *,
    cfg: Params,
) -> None:
    """Write the models x datasets accuracy table (Markdown + CSV) beside the seed's numbers."""
    _results, paths = stages.report(cfg, from_registry=from_registry)
    out.print(paths["markdown"].read_text())
    out.print(f"written: {paths['markdown']} and {paths['csv']}")
