"""What every ferflow Typer app shares: the app settings, the --params/--set/--verbose
options, loading params with them, and the console entry point's error handling.

Used by the `ferflow` CLI (ferflow.cli) and its sub-apps (`ferflow pipeline`, `ferflow
serve`); it imports typer and rich only, so a sub-app stays quick to start.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ferflow.errors import FerflowError
from ferflow.redact import install_log_filter, redact_text

if TYPE_CHECKING:
    from ferflow.config import Params

DEFAULT_PARAMS = Path("params.yaml")
PARAMS_HELP = "params file (YAML)"


def override_help(example: str, what: str = "override a key") -> str:
    """--set's help; `example` is a key the command reads, so the help shows what fits it.
    Escaped: help is rich markup, where a list value like [enet_b0_7] would read as a tag."""
    return f"{what}: --set {escape(example)} (repeatable)"


out = Console()
err = Console(stderr=True)
_state = {"verbose": False}  # --verbose, before or after the command: main() then prints tracebacks


def _show_flags_bare() -> None:
    """Typer 0.29's rich help puts a value type beside every option, flags included
    (`--verbose <bool>`, even `--help <bool>`), as if a flag took a value: `--verbose true`
    then fails on `true`. Its plain help leaves flags (and counters) bare; so do we."""
    from typer.core import TyperOption

    typed = getattr(TyperOption, "display_type_rich", None)
    if typed is None or getattr(typed, "flags_bare", False):
        return  # another Typer without the hook (pyproject allows newer ones), or already done

    def display_type_rich(self: TyperOption, ctx: Any) -> Optional[str]:
        return None if self.is_flag or self.count else typed(self, ctx)

    display_type_rich.flags_bare = True
    TyperOption.display_type_rich = display_type_rich


_show_flags_bare()


def typer_app(name: str, help: str) -> typer.Typer:
    """A ferflow (sub-)app: help when called bare, no shell-completion options, and
    exceptions left to run_app (Typer's pretty tracebacks would bypass redaction)."""
    return typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False)


def params_option(help: str = PARAMS_HELP) -> Any:
    """The --params/-p option type; `help` says what the command reads from the file."""
    return Annotated[Path, typer.Option("--params", "-p", help=help, show_default=True)]


def set_option(help: str) -> Any:
    """The repeatable --set/-s KEY=VALUE option type; `help` from override_help."""
    return Annotated[Optional[list[str]], typer.Option("--set", "-s", help=help)]


VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show tracebacks and debug logs")]


def set_verbose(verbose: bool) -> None:
    _state["verbose"] = verbose


def verbose_mode(verbose: bool) -> None:
    """A command's --verbose: tracebacks (run_app) and debug logs."""
    if verbose:
        set_verbose(True)
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
        install_log_filter()  # debug lines of urllib3 & co. carry query strings


def load(params: Path, overrides: Optional[list[str]]) -> Params:
    """The params file with --set overrides applied."""
    from ferflow.config import load_params  # lazily: pydantic and the params models

    return load_params(params, overrides or [])


def with_parameters(wrapper: Callable, parameters: list[inspect.Parameter]) -> Callable:
    """`wrapper` (a functools.wraps of a command) as a command taking `parameters`: typer
    reads both the signature and the annotations."""
    wrapper.__signature__ = inspect.signature(wrapper, eval_str=True).replace(parameters=parameters)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


def with_verbose(command: Callable) -> Callable:
    """`command` with --verbose as its last option."""
    own = list(inspect.signature(command, eval_str=True).parameters.values())
    last = inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=VerboseOpt)

    @functools.wraps(command)
    def wrapper(*args, verbose: bool, **kwargs):
        verbose_mode(verbose)
        return command(*args, **kwargs)

    return with_parameters(wrapper, [*own, last])


def params_loader(params_help: str = PARAMS_HELP, set_help: Optional[str] = None, *,
                  example: Optional[str] = None) -> Callable[[Callable], Callable]:
    """A decorator for commands that run on params: the command declares a keyword-only
    `cfg` parameter and receives the loaded params there. On the command line, --params and
    --set stand where `cfg` does (so the help lists them in that place) and --verbose comes
    last. --set's help is `set_help`, or override_help(`example`): a key=value the command
    reads, required so that no command shows another's example."""
    if (set_help is None) == (example is None):
        raise TypeError("params_loader: give --set's `example` (or its whole `set_help`)")
    added = [
        inspect.Parameter("params", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT_PARAMS,
                          annotation=params_option(params_help)),
        inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=set_option(override_help(example) if example else set_help)),
    ]

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        own = list(signature.parameters.values())
        names = [p.name for p in own]
        if "cfg" not in names or signature.parameters["cfg"].kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"{command.__name__}: declare the params as a keyword-only `cfg` parameter")
        at = names.index("cfg")

        @functools.wraps(command)
        def wrapper(*args, params: Path, set_: Optional[list[str]], **kwargs):
            return command(*args, cfg=load(params, set_), **kwargs)

        return with_verbose(with_parameters(wrapper, [*own[:at], *added, *own[at + 1:]]))

    return decorate


def params_checked(example: str) -> Callable[[Callable], Callable]:
    """For a command that reads no params (it works on other inputs alone): --params and
    --set are still accepted, so that every ferflow command takes them (scripts can pass
    them uniformly), and checked when given, a bad key failing as anywhere else. Without
    either, nothing is read: such a command also runs outside a checkout."""
    added = [
        inspect.Parameter("params", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[Path], typer.Option("--params", "-p", help="params file to check (YAML); this command "
                                         "uses no params value", show_default=False)]),
        inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=set_option(override_help(example, "override a key, checked with the file"))),
    ]

    def decorate(command: Callable) -> Callable:
        own = list(inspect.signature(command, eval_str=True).parameters.values())

        @functools.wraps(command)
        def wrapper(*args, params: Optional[Path], set_: Optional[list[str]], **kwargs):
            if params is not None or set_:
                load(params or DEFAULT_PARAMS, set_)
            return command(*args, **kwargs)

        return with_verbose(with_parameters(wrapper, [*own, *added]))

    return decorate


def run_app(app: typer.Typer, argv: Optional[list[str]] = None) -> None:
    """Run `app` as a console script: a FerflowError becomes one line on stderr (plus the
    traceback with --verbose) and its exit code; click's standalone mode handles usage
    errors and exits itself."""
    install_log_filter()
    try:
        app(args=argv)
    except FerflowError as exc:
        if _state["verbose"]:
            err.print(redact_text(traceback.format_exc()), highlight=False, markup=False)
        err.print(f"[bold red]error:[/] {escape(redact_text(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
