"""The operator's command line (Typer). Formats output and errors; no logic.

Heavy modules (jinja2, the spec models, pyroute2, systemd) are imported inside
the commands that need them, so ``pymachine --help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated

import typer

from pymachined import __version__
from pymachined.errors import PymachineError
from pymachined.layout import Layout

if TYPE_CHECKING:
    from pymachined.validate import SpecSet

app = typer.Typer(
    name="pymachine",
    help="Declarative manager for systemd-nspawn machines.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@dataclass
class Options:
    """Global options, set by the callback before any command runs."""

    root: Path = Path("/")
    debug: bool = False

    @property
    def layout(self) -> Layout:
        """Host paths under --root."""
        return Layout(PurePosixPath(self.root))


options = Options()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pymachine {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    root: Annotated[
        Path,
        typer.Option(
            envvar="PYMACHINE_ROOT",
            help="Keep all of pymachine's state under this directory instead of /.",
        ),
    ] = Path("/"),
    debug: Annotated[
        bool, typer.Option("--debug", help="Print every command run, and tracebacks.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Declarative manager for systemd-nspawn machines."""
    if not root.is_absolute():
        root = Path.cwd() / root
    options.root = root
    options.debug = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )


def _spec_set(paths: list[Path]) -> SpecSet:
    from pymachined.resources import data_dir
    from pymachined.validate import load_set

    layout = options.layout
    state_dirs = [PurePosixPath("/var/lib/pymachine"), PurePosixPath("/run/pymachine")]
    if layout.root != PurePosixPath("/"):
        state_dirs += [layout.state_dir, layout.run_dir]
    return load_set(paths, data_dir("machines"), state_dirs)


PathsArg = Annotated[
    list[Path], typer.Argument(help="Spec files or directories (searched recursively).")
]


@app.command()
def validate(paths: PathsArg) -> None:
    """Check spec files and report every problem with its file, line and field."""
    spec_set = _spec_set(paths)
    files = len({located.document.file for located in spec_set.sources.values()})
    images = len(spec_set.sources) - len(spec_set.machines) - len(spec_set.networks)
    counts = [
        _plural(len(spec_set.machines), "machine"),
        _plural(len(spec_set.networks), "network"),
        _plural(images, "image"),
    ]
    typer.echo(f"ok: {', '.join(counts)} in {_plural(files, 'file')}")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


@app.command()
def schema() -> None:
    """Print the JSON Schema of spec documents, for editors and CI."""
    import json

    from pymachined.schema import json_schema

    typer.echo(json.dumps(json_schema(), indent=2, sort_keys=True))


@app.command()
def render(
    path: Annotated[Path, typer.Argument(help="Spec file or directory.")],
    name: Annotated[str, typer.Argument(help="The machine whose files to print.")],
) -> None:
    """Print the files a machine would get on this host."""
    from pymachined.render import machine_files
    from pymachined.resources import data_dir

    spec_set = _spec_set([path])
    machine = spec_set.machines.get(name)
    if machine is None:
        known = ", ".join(sorted(spec_set.machines)) or "none"
        raise PymachineError(
            f"no machine named {name!r} in {path}", hint=f"machines declared: {known}"
        )
    for index, rendered in enumerate(machine_files(machine, options.layout, data_dir("templates"))):
        if index:
            typer.echo()
        typer.echo(f"### {rendered.path}")
        typer.echo(rendered.content, nl=False)


def _report(error: PymachineError) -> int:
    details = error.lines()
    if details != [error.message]:
        for line in details:
            typer.echo(f"error: {line}", err=True)
    typer.echo(f"error: {error.message}", err=True)
    if error.hint:
        typer.echo(f"hint: {error.hint}", err=True)
    return error.exit_code


def main() -> None:
    """Console entry point: Click reports usage errors itself (exit 2); pymachine's
    own errors are printed for people (exit 1), with a traceback only with --debug."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("PYMACHINE_DEBUG") == "1"
    try:
        app()
    except PymachineError as error:
        if debug:
            traceback.print_exc()
        sys.exit(_report(error))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:  # a bug: say so, with the way to see more
        if debug:
            traceback.print_exc()
        typer.echo(f"error: internal error: {type(error).__name__}: {error}", err=True)
        typer.echo("hint: run again with --debug for the traceback, and report it", err=True)
        sys.exit(1)
