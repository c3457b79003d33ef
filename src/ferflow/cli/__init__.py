"""`ferflow`: one subcommand per pipeline stage. Each reads params.yaml (or --params) plus
--set overrides, and calls the same stage function that dvc.yaml and the KFP components use.

The commands live by concern in this package (data, training, registry, inference, parent_run);
`pipeline` and `serve` are the sub-apps of ferflow.pipeline.cli and ferflow.serving.cli.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ferflow import __version__
from ferflow.cli import data, inference, parent_run, registry, training
from ferflow.commandline import VerboseOpt, out, run_app, set_verbose, typer_app
from ferflow.pipeline.cli import pipeline_app
from ferflow.serving.cli import serve_app

app = typer_app("ferflow", "Facial-expression recognition under face masks: fetch, prepare, train, evaluate, track.")


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
    set_verbose(verbose)


# Unnamed sub-apps merge their commands into `ferflow`, in this order (the order of --help).
for commands in (data.app, training.app, registry.app, inference.app, parent_run.app):
    app.add_typer(commands)
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(serve_app, name="serve")


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit."""
    run_app(app, argv)
