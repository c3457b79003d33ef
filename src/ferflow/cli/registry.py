"""`ferflow registry`: which version is champion and why — every registered version with its
aliases, gate metric, eval data, base checkpoint and source run, and the promotion log."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from ferflow.commandline import out, params_loader
from ferflow.config import Params

app = typer.Typer()  # merged into `ferflow` (ferflow.cli)


@app.command("registry")
@params_loader(example="registry.metric=eval_macro_f1")
def registry_cmd(
    dataset: Annotated[Optional[list[str]], typer.Option(
        "--dataset", "-d", metavar="DATASET", help="only this dataset's registered model (repeatable)")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="print JSON (every field, full digests) instead of tables")] = False,
    history: Annotated[int, typer.Option(
        "--history", min=0, metavar="N", help="promotion decisions shown per model, the latest (0: all)")] = 10,
    *,
    cfg: Params,
) -> None:
    """Which version is champion, and why: registered versions, aliases, metrics, promotion log.

    Per registered model: each version with its aliases, the gate metric and the zero-shot
    start it had to beat, the eval data digest, the base checkpoint, the source run and its
    latest decision; then the promotion log, newest last.

    Example: `ferflow registry -d LFW-FER` (tables); `ferflow registry --json --history 0`
    (every version and decision, for scripts).
    """
    from ferflow.tracking.overview import registry_overview

    models = registry_overview(cfg, dataset, history or None)
    if as_json:
        typer.echo(json.dumps({"models": [m.as_dict() for m in models]}, indent=2))
        return
    if not models:
        out.print("no registered models yet for the datasets in params; `ferflow register` makes one")
    for model in models:
        out.print(_versions_table(model))
        out.print(_history(model) if model.history else f"{model.name}: no promotion decision logged yet")


def _versions_table(model) -> Table:
    gate = (f"gate: {model.metric} (start: its base checkpoint zero-shot on the same data), min_delta "
            f"{model.min_delta:g}; a first champion must beat its start, else reach {model.first_champion_min:g}")
    table = Table(title=f"{model.name} ({model.dataset}): champion {_v(model.champion)}", caption=gate,
                  box=box.SIMPLE_HEAD)
    for header in ("v", "aliases", "gate", "start", "eval data"):
        table.add_column(header, no_wrap=True)
    table.add_column("base checkpoint", overflow="fold")
    table.add_column("source run", overflow="fold")
    table.add_column("decision", no_wrap=True)
    for v in model.versions:
        run = (v.run_id or "none") + (f" (trial {v.dvc_experiment})" if v.dvc_experiment else "")
        data = v.eval_manifest_sha256[:12] + ("" if v.eval_split == "eval" else f"/{v.eval_split}")
        table.add_row(v.version, " ".join(v.aliases) or "–", _num(v.metric_value), _num(v.start_value), data,
                      escape(f"{v.model}: {v.base_checkpoint}"), escape(run), v.decision or "–")
    return table


def _history(model) -> str:
    """The log as lines (the reasons are sentences: a table column would squeeze them)."""
    lines = [f"[bold]{escape(model.name)}: promotion log, oldest first[/]"]
    for entry in model.history:
        if "unreadable" in entry:
            lines.append(f"  ? unreadable entry {escape(entry['key'])}: {escape(entry['unreadable'])}")
            continue
        made_by = entry.get("kfp_run_id") or entry.get("dvc_experiment")
        head = (f"{entry.get('at', '?')}  {entry.get('action', '?')} {_v(entry.get('candidate_version'))} "
                f"({_num(entry.get('candidate_value'))})  champion {_v(entry.get('champion_version'))} → "
                f"{_v(entry.get('champion_after'))}" + (f"  by {made_by}" if made_by else ""))
        lines += [f"  {escape(head)}", f"      {escape(str(entry.get('reason', '')))}"]
    return "\n".join(lines)


def _v(version: Optional[str]) -> str:
    return f"v{version}" if version else "none"


def _num(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.4f}"
