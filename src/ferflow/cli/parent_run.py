"""`ferflow parent-run`: one MLflow parent run around a whole DAG invocation (`dvc repro`)."""

from __future__ import annotations

from typing import Annotated

import typer

from ferflow.commandline import out, params_loader
from ferflow.config import Params
from ferflow.errors import ConfigError, FerflowError

app = typer.Typer()  # merged into `ferflow` (ferflow.cli)


@app.command(
    "parent-run",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
@params_loader(example="tracking.experiment=nightly")
def parent_run_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="MLflow run name of the DAG invocation")] = "dag",
    *,
    cfg: Params,
) -> None:
    """Run a command (e.g. `dvc repro`) under one MLflow parent run: `ferflow parent-run -- dvc repro`.

    Training runs started by the command nest under it (FERFLOW_PARENT_RUN_ID).
    """
    import subprocess

    from ferflow.tracking.parent_runs import parent_run

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
