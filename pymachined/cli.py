"""The operator's command line (Typer): parses options, calls the library, and
formats output and errors for people.

Heavy modules (jinja2, the spec models, pyroute2, systemd) are imported inside
the commands that need them, so ``pymachine --help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pymachined import __version__
from pymachined.errors import HOST_ERRNOS, PymachineError, UsageError, host_error
from pymachined.layout import Layout

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager
    from datetime import datetime

    from pymachined.actions import Action
    from pymachined.desired import Desired
    from pymachined.images import ImageStore
    from pymachined.reconcile import Reconciler
    from pymachined.records import MachineRecord
    from pymachined.validate import SpecSet
    from pymachined.verbs import Verbs

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

    layout: Layout = field(default_factory=Layout)
    debug: bool = False


options = Options()


def _name_check(kind: str) -> Callable[[Any], Any]:
    """A Click callback holding names on the command line to the rule specs
    follow, before a command builds a path or a host-wide name from them."""

    def check(value: Any) -> Any:
        from pymachined.spec import check_name

        for name in value if isinstance(value, list) else [value]:
            if name is None:
                continue
            try:
                check_name(name)
            except ValueError as exc:
                raise PymachineError(
                    f"{kind} name {exc}",
                    hint=f"{kind} names follow the rule of the name field in specs "
                    "(see docs/spec.md); nothing was changed",
                ) from exc
        return value

    return check


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
    from pymachined.files import host_layout

    options.layout = host_layout(root)
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
    name: Annotated[
        str,
        typer.Argument(help="The machine whose files to print.", callback=_name_check("machine")),
    ],
) -> None:
    """Print the files a machine would get on this host."""
    from pymachined.reconcile import host_resolv_conf, program
    from pymachined.render import machine_files
    from pymachined.resources import data_dir

    spec_set = _spec_set([path])
    machine = spec_set.machines.get(name)
    if machine is None:
        known = ", ".join(sorted(spec_set.machines)) or "none"
        raise PymachineError(
            f"no machine named {name!r} in {path}", hint=f"machines declared: {known}"
        )
    files = machine_files(
        machine, options.layout, data_dir("templates"), program(), host_resolv_conf()
    )
    for index, rendered in enumerate(files):
        if index:
            typer.echo()
        typer.echo(f"### {rendered.path}")
        typer.echo(rendered.content, nl=False)


# ---------------------------------------------------------------------------
# Output


class Format(StrEnum):
    """How read commands print."""

    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


OutputOption = Annotated[Format, typer.Option("--output", "-o", help="table, json or yaml.")]


def _print_data(data: object, fmt: Format) -> None:
    """data as JSON, or as YAML."""
    if fmt is Format.YAML:
        import yaml

        typer.echo(yaml.safe_dump(data, sort_keys=False), nl=False)
    else:
        import json

        typer.echo(json.dumps(data, indent=2, default=str))


def _print_rows(rows: list[dict[str, Any]], columns: list[str], fmt: Format) -> None:
    """rows as JSON or YAML, or as an aligned table of columns."""
    if fmt is not Format.TABLE:
        _print_data(rows, fmt)
        return
    texts = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(t[i]) for t in texts)]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for text in texts:
        typer.echo("  ".join(t.ljust(w) for t, w in zip(text, widths, strict=True)).rstrip())


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


# ---------------------------------------------------------------------------
# Reconciling


SupervisorOption = Annotated[
    str,
    typer.Option(
        "--supervisor",
        envvar="PYMACHINE_SUPERVISOR",
        help="auto (systemd if it is PID 1, else pymachined), builtin or systemd.",
    ),
]
PruneOption = Annotated[
    bool, typer.Option("--prune", help="Remove recorded machines no spec declares.")
]


def _reconciler(supervisor: str) -> Reconciler:
    from pymachined.reconcile import Reconciler, choose_supervisor
    from pymachined.resources import data_dir

    layout = options.layout
    return Reconciler(
        layout, _store(), choose_supervisor(layout, supervisor), data_dir("templates")
    )


def _host_lock(timeout: float | None) -> AbstractContextManager[None]:
    from pymachined.verbs import host_lock

    return host_lock(options.layout, timeout, waiting=lambda m: typer.echo(m, err=True))


def _planned(
    reconciler: Reconciler, paths: list[Path], prune: bool
) -> tuple[dict[str, Desired], list[Action], list[str]]:
    spec_set = _spec_set(paths)
    if prune and not spec_set.machines:
        raise PymachineError(
            f"{', '.join(map(str, paths))} declares no machines; refusing to prune them all",
            hint="check the path; to remove every machine, use pymachine destroy",
        )
    return reconciler.plan(spec_set, prune=prune)


def _show_undeclared(names: list[str]) -> None:
    """Say which recorded machines the specs leave out, which a plan does not touch."""
    if names:
        typer.echo(
            f"note: no spec declares {', '.join(names)}; they are left as they are "
            "(--prune would remove them)",
            err=True,
        )


def _show_plan(desired: dict[str, Desired], actions: list[Action], fmt: Format) -> None:
    from pymachined.plan import warnings

    for warning in warnings(desired, actions):
        typer.echo(f"warning: {warning}", err=True)
    if fmt is not Format.TABLE:
        _print_data([a.as_json() for a in actions], fmt)
    elif not actions:
        typer.echo("nothing to do: the host matches the specs")
    else:
        for action in actions:
            typer.echo(f"  {action.describe()}")


@app.command()
def plan(
    paths: PathsArg,
    prune: PruneOption = False,
    output: OutputOption = Format.TABLE,
    supervisor: SupervisorOption = "auto",
) -> None:
    """Show what apply would do; exit 0 if the host matches the specs, 2 if not,
    1 if a record cannot be read (its machine is left out of the plan)."""
    reconciler = _reconciler(supervisor)
    desired, actions, problems = _planned(reconciler, paths, prune)
    _show_plan(desired, actions, output)
    _show_problems(problems)
    if not prune:
        _show_undeclared(reconciler.undeclared(desired))
    raise typer.Exit(1 if problems else 2 if actions else 0)


def _show_problems(problems: list[str]) -> None:
    """The machines a plan leaves as they are, each as an error line."""
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)


@app.command()
def apply(
    paths: PathsArg,
    prune: PruneOption = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan only.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    lock_timeout: Annotated[
        float | None, typer.Option(help="Give up after this many seconds waiting for the lock.")
    ] = None,
    supervisor: SupervisorOption = "auto",
) -> None:
    """Make the host match the specs: build, create, start, restart, stop, remove."""
    reconciler = _reconciler(supervisor)
    with _host_lock(lock_timeout):
        desired, actions, problems = _planned(reconciler, paths, prune)
        _show_plan(desired, actions, Format.TABLE)
        _show_problems(problems)
        if not prune:
            _show_undeclared(reconciler.undeclared(desired))
        if dry_run:
            raise typer.Exit(1 if problems else 0)
        if actions:
            if not yes and sys.stdin.isatty():
                typer.confirm("apply these changes?", abort=True)
            reconciler.execute(desired, actions, lambda text: typer.echo(f"-> {text}", err=True))
        # Said by the executor before its starts; here for an apply with nothing to do.
        reconciler.supervisor.ready()
        if not problems:
            reconciler.supervisor.settled()
        if not actions:
            raise typer.Exit(1 if problems else 0)
    typer.echo(f"applied {_plural(len(actions), 'change')}")
    if problems:
        raise PymachineError(
            f"{len(problems)} left as they are, each with a record that cannot be "
            "read (see the errors above)",
            hint="inspect the files named above, repair or remove them, then apply again",
        )


def _uptime(started: float | None) -> str | None:
    if started is None:
        return None
    import time

    seconds = int(time.time() - started)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@app.command("ls")
def list_machines(
    output: OutputOption = Format.TABLE, supervisor: SupervisorOption = "auto"
) -> None:
    """List machines: name, state, image, address, uptime, restarts."""
    from pymachined.state import StateStore

    reconciler = _reconciler(supervisor)
    statuses = reconciler.supervisor.status()
    names = {r.key: r.name for r in reconciler.images.records()}
    rows: list[dict[str, Any]] = []
    records, unreadable = StateStore(options.layout).scan()
    for name, problem in unreadable.items():
        typer.echo(f"error: {name}: {problem}", err=True)
        rows.append(
            {
                "name": name,
                "state": "unreadable",
                "image": None,
                "address": None,
                "uptime": None,
                "restarts": 0,
                "exit_code": None,
                "pid": None,
            }
        )
    for name, record in records.items():
        status = statuses.get(name)
        state = status.state.value if status else ("created" if record.run is None else "exited")
        running = status is not None and status.pid is not None
        rows.append(
            {
                "name": name,
                "state": state,
                "image": (record.spec or {}).get("image")
                or (names.get(record.layers[0], record.layers[0]) if record.layers else None),
                "address": record.address,
                "uptime": _uptime(status.started) if running and status else None,
                "restarts": status.restarts if status else 0,
                "exit_code": status.exit_code if status else None,
                "pid": status.pid if status else None,
            }
        )
    rows.sort(key=lambda row: str(row["name"]))
    _print_rows(rows, ["name", "state", "image", "address", "uptime", "restarts"], output)
    if unreadable:
        raise typer.Exit(1)


def _known(name: str) -> MachineRecord:
    from pymachined.state import StateStore

    record = StateStore(options.layout).get(name)
    if record is None:
        raise PymachineError(f"no machine named {name!r}", hint="see pymachine ls")
    return record


NameArg = Annotated[str, typer.Argument(help="The machine.", callback=_name_check("machine"))]
NetworkArg = Annotated[str, typer.Argument(help="The network.", callback=_name_check("network"))]


def _verbs(supervisor: str) -> Verbs:
    from pymachined.verbs import Verbs

    reconciler = _reconciler(supervisor)
    return Verbs(
        options.layout,
        reconciler.images,
        reconciler.supervisor,
        waiting=lambda m: typer.echo(m, err=True),
    )


def _confirm_dependents(verbs: Verbs, name: str, verb: str, yes: bool) -> None:
    """Before stopping a machine others need: say which, and ask (or --yes)."""
    needing = verbs.running_dependents(name)
    if not needing or yes:
        return
    which = ", ".join(needing)
    if sys.stdin.isatty():
        typer.confirm(
            f"{which} need{'s' if len(needing) == 1 else ''} {name}; {verb} it?", abort=True
        )
        return
    raise PymachineError(
        f"{which} {'needs' if len(needing) == 1 else 'need'} {name} (depends_on) and "
        f"{'is' if len(needing) == 1 else 'are'} running",
        hint=f"stop {'it' if len(needing) == 1 else 'them'} first, or pass --yes to {verb} "
        f"{name} anyway (under systemd, what needs it stops with it)",
    )


YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")]


@app.command()
def start(name: NameArg, supervisor: SupervisorOption = "auto") -> None:
    """Start a machine with the configuration it was last applied with."""
    started = _verbs(supervisor).start(name)
    typer.echo(f"started {name}" if started else f"{name} is running already")


@app.command("prepare", hidden=True)
def prepare(name: NameArg) -> None:
    """Assemble what a machine needs to start if the host lacks it: its root
    and its network (bridge, namespace, rules); a stale registration with
    machined cleared. Its unit runs this before systemd-nspawn, so machines
    start at boot and by systemctl alone, and after nspawn was killed."""
    from pymachined import verbs

    verbs.prepare(options.layout, _store(), name)


# The name units rendered by earlier versions run before their next apply.
app.command("mount-root", hidden=True)(prepare)


@app.command("forward-ports", hidden=True)
def forward_ports(name: NameArg) -> None:
    """Start a machine's IPv6 port forwarders (its unit runs this once the
    machine is up, so they live and die with the unit)."""
    from pymachined.execute import start_recorded_forwarders

    start_recorded_forwarders(options.layout, _known(name))


@app.command()
def stop(name: NameArg, yes: YesOption = False, supervisor: SupervisorOption = "auto") -> None:
    """Stop a machine (apply starts it again if its spec says state: running)."""
    verbs = _verbs(supervisor)
    verbs.record(name)
    _confirm_dependents(verbs, name, "stop", yes)
    status = verbs.stop(name)
    typer.echo(f"stopped {name} (exit code {status.exit_code})")


@app.command()
def restart(name: NameArg, supervisor: SupervisorOption = "auto") -> None:
    """Restart a machine; under systemd, the machines that need it restart too."""
    _verbs(supervisor).restart(name)
    typer.echo(f"restarted {name}")


@app.command()
def destroy(name: NameArg, yes: YesOption = False, supervisor: SupervisorOption = "auto") -> None:
    """Stop a machine and remove its root, files and record."""
    verbs = _verbs(supervisor)
    verbs.record(name)
    _confirm_dependents(verbs, name, "destroy", yes)
    if not yes and sys.stdin.isatty():
        typer.confirm(f"destroy {name} and everything written in it?", abort=True)
    verbs.destroy(name)
    typer.echo(f"destroyed {name}")


# ---------------------------------------------------------------------------
# Operating machines


@app.command()
def inspect(
    name: NameArg,
    output: Annotated[Format, typer.Option("--output", "-o", help="json or yaml.")] = Format.JSON,
    supervisor: SupervisorOption = "auto",
) -> None:
    """One document: the spec as applied, the command line it runs with,
    its state and exit code, root layers, address, supervisor process, resource
    limits and user namespace."""
    from pymachined import rootfs

    record = _known(name)
    chosen = _reconciler(supervisor).supervisor
    status = chosen.status().get(name)
    root = rootfs.read(options.layout, name)
    document = {
        "name": name,
        "spec": record.spec,
        "state": status.as_json() if status else None,
        "run": chosen.run_view(name, record.run, record.spec) if record.run else None,
        "root": {
            "mode": root.mode.value if root else None,
            "path": str(options.layout.rootfs(name)),
            "layers": list(root.layers) if root else [],
        },
        "network": record.network or (record.spec or {}).get("network"),
        "address": record.address,
        "files": sorted(record.files),
        "created": record.created,
        "history": list(record.history),
        "resources": (record.spec or {}).get("resources"),
        "limits": (record.run or {}).get("limits"),
        "user_namespace": rootfs.user_namespace(options.layout, name),
    }
    _print_data(document, Format.JSON if output is Format.TABLE else output)


SinceOption = Annotated[
    str | None,
    typer.Option(
        help="Only from this long ago on (10m, 1h30m), or from a UTC time (2026-11-28T10:00:00)."
    ),
]


def _since(value: str | None) -> datetime | None:
    """The start of a --since window, as an aware UTC time."""
    from datetime import UTC, datetime, timedelta

    from pymachined.sizes import parse_duration

    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.removesuffix("Z"))
    except ValueError:
        try:
            return datetime.now(UTC) - timedelta(seconds=parse_duration(value))
        except ValueError as exc:
            raise UsageError(f"--since: {exc}, nor a time such as 2026-11-28T10:00:00") from exc
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _journal_logs(
    unit: str, follow: bool, lines: int | None, since: datetime | None, timestamps: bool
) -> None:
    """A unit's output from the journal (systemd.journal.Reader), in the same
    form as pymachined's logs."""
    from collections import deque
    from datetime import UTC

    from systemd import journal

    from pymachined.commands import LOG_TIME_FORMAT

    reader = journal.Reader()
    reader.add_match(_SYSTEMD_UNIT=unit)
    if since is not None:
        reader.seek_realtime(since)

    def show(entry: dict[str, Any]) -> None:
        message = entry.get("MESSAGE", "")
        text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
        when = entry.get("__REALTIME_TIMESTAMP")
        if timestamps and when is not None:
            text = f"{when.astimezone(UTC).strftime(LOG_TIME_FORMAT)} {text}"
        typer.echo(text)

    entries: list[dict[str, Any]] | deque[dict[str, Any]] = (
        list(reader) if lines is None else deque(reader, maxlen=lines)
    )
    for entry in entries:
        show(entry)
    while follow:
        reader.wait(1.0)
        for entry in reader:
            show(entry)


@app.command()
def logs(
    name: NameArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output.")
    ] = False,
    lines: Annotated[
        int | None, typer.Option("--tail", "-n", help="Only the last N lines.", min=0)
    ] = None,
    since: SinceOption = None,
    timestamps: Annotated[
        bool, typer.Option("--timestamps", "-t", help="Start each line with its UTC time.")
    ] = False,
    journal: Annotated[
        bool,
        typer.Option(
            "--journal", "-j", help="A booted machine's own journal (its services' messages)."
        ),
    ] = False,
    supervisor: SupervisorOption = "auto",
) -> None:
    """A machine's output: its unit's journal under systemd, else its console as
    pymachined captured it, each line stamped with the time it came. With
    --journal, a booted machine's own journal, read inside it by its own
    journalctl, confined as exec's commands are (under both supervisors)."""
    import itertools
    import time
    from collections import deque
    from collections.abc import Iterator

    from pymachined import commands
    from pymachined.commands import LOG_TIME_FORMAT, rotated_log
    from pymachined.desired import console_log
    from pymachined.parsers import parse_log_line

    record = _known(name)
    from pymachined.supervise.systemd import SystemdSupervisor

    start = _since(since)
    if journal:
        if not (record.spec or {}).get("boot"):
            raise PymachineError(
                f"{name} is not booted: its output is all there is",
                hint=f"pymachine logs {name}",
            )
        moment = start.strftime("%Y-%m-%d %H:%M:%S") if start is not None else None
        argv = commands.journal_argv(follow, lines, moment, timestamps)
        raise typer.Exit(_enter(name, supervisor, argv, "root", None, None))
    if isinstance(_reconciler(supervisor).supervisor, SystemdSupervisor):
        _journal_logs(options.layout.unit_name(name), follow, lines, start, timestamps)
        return
    path = console_log(options.layout, name)
    rotated = Path(rotated_log(PurePosixPath(path)))
    if not path.exists() and not rotated.exists():
        typer.echo(f"{name} has no output yet", err=True)
        return
    # Stamps and the boundary share one fixed format, so they compare as text.
    boundary = start.strftime(LOG_TIME_FORMAT) if start is not None else None

    def show(line: str) -> None:
        stamp, text = parse_log_line(line)
        if boundary is not None and (stamp is None or stamp < boundary):
            return
        typer.echo(f"{stamp} {text}" if timestamps and stamp else text, nl=False)

    def read(source: Path) -> Iterator[str]:
        try:
            with source.open(errors="replace") as handle:
                yield from handle
        except FileNotFoundError:
            return

    # The rotated part first: the two are the machine's output in order.
    both = itertools.chain(read(rotated), read(path))
    for line in both if lines is None else deque(both, maxlen=lines):
        show(line)
    if not follow:
        return
    handle = path.open(errors="replace")
    handle.seek(0, os.SEEK_END)
    try:
        while True:
            line = handle.readline()
            if line:
                show(line)
                continue
            try:
                renamed = path.stat().st_ino != os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                renamed = False  # between the rename and the next line
            if renamed:  # rotated: the rest of the old file, then on to the new one
                for rest in handle:
                    show(rest)
                handle.close()
                handle = path.open(errors="replace")
            else:
                time.sleep(0.2)
    finally:
        handle.close()


def _leader(name: str, supervisor: str) -> int:
    """The host pid of a running machine's PID 1, once it runs the payload
    (waiting at most 30 s for a machine that is starting)."""
    import time

    from pymachined.procs import leader_pid, payload_running
    from pymachined.supervise.base import RunState

    _known(name)
    reconciler = _reconciler(supervisor)
    deadline = time.monotonic() + 30
    while True:
        status = reconciler.supervisor.status().get(name)
        if status is not None and status.state == RunState.PAUSED:
            raise PymachineError(f"machine {name} is paused", hint=f"pymachine unpause {name}")
        if status is None or status.pid is None:
            raise PymachineError(f"machine {name} is not running", hint=f"pymachine start {name}")
        pid = leader_pid(status.pid)
        if pid is not None and payload_running(status.pid, pid):
            return pid
        if time.monotonic() > deadline:
            raise PymachineError(f"machine {name} is still starting after 30 s")
        time.sleep(0.1)  # nspawn is still preparing the machine


UserOption = Annotated[
    str | None,
    typer.Option(
        "--user", "-u", help="USER[:GROUP], a name or number (the machine's user by default)."
    ),
]
WorkdirOption = Annotated[
    str | None,
    typer.Option("--workdir", "-w", help="The working directory (the machine's by default)."),
]
EnvOption = Annotated[
    list[str] | None,
    typer.Option("--env", "-e", help="KEY=VALUE over the machine's environment (repeatable)."),
]


def _enter(
    name: str,
    supervisor: str,
    command: list[str],
    user: str | None,
    workdir: str | None,
    env: list[str] | None,
) -> int:
    """Run command in a running machine, confined as its PID 1 is; the exit code."""
    import sys

    from pymachined import commands, run

    for pair in env or []:
        if "=" not in pair or pair.startswith("="):
            raise UsageError(f"--env {pair!r}: not KEY=VALUE")
    record = _known(name)
    spec = record.spec or {}
    pid = _leader(name, supervisor)
    environment = [f"TERM={os.environ.get('TERM', 'dumb')}"]
    environment += [f"{k}={v}" for k, v in sorted(spec.get("environment", {}).items())]
    environment += env or []
    argv = commands.enter_argv(
        sys.executable,
        pid,
        command,
        environment,
        user if user is not None else spec.get("user"),
        workdir if workdir is not None else spec.get("workdir"),
    )
    return run.interactive(argv)


@app.command(
    "exec", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True}
)
def exec_command(
    name: NameArg,
    command: Annotated[list[str], typer.Argument(help="The command and its arguments.")],
    user: UserOption = None,
    workdir: WorkdirOption = None,
    env: EnvOption = None,
    supervisor: SupervisorOption = "auto",
) -> None:
    """Run a command in a running machine, confined as the machine's own PID 1
    is (cgroups, namespaces, bounding set, no_new_privs, seccomp filters), with
    its environment, user and working directory; options go before NAME. The
    exit code is the command's (128+N when signal N killed it)."""
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("exec needs a command: pymachine exec NAME -- COMMAND...")
    raise typer.Exit(_enter(name, supervisor, command, user, workdir, env))


@app.command()
def shell(
    name: NameArg,
    user: UserOption = None,
    workdir: WorkdirOption = None,
    env: EnvOption = None,
    supervisor: SupervisorOption = "auto",
) -> None:
    """A login shell in a running machine, confined as exec's commands are."""
    login = ["/bin/sh", "-c", "exec $(command -v bash || command -v sh) -l"]
    raise typer.Exit(_enter(name, supervisor, login, user, workdir, env))


@app.command()
def pause(name: NameArg, supervisor: SupervisorOption = "auto") -> None:
    """Freeze every process of a running machine (the cgroup freezer)."""
    _verbs(supervisor).pause(name, True)
    typer.echo(f"paused {name}")


@app.command()
def unpause(name: NameArg, supervisor: SupervisorOption = "auto") -> None:
    """Resume a paused machine."""
    _verbs(supervisor).pause(name, False)
    typer.echo(f"unpaused {name}")


@app.command()
def stats(
    names: Annotated[
        list[str] | None,
        typer.Argument(
            help="Machines (all running ones if none).", callback=_name_check("machine")
        ),
    ] = None,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="One sample, then exit.")] = False,
    output: OutputOption = Format.TABLE,
    supervisor: SupervisorOption = "auto",
) -> None:
    """CPU %, memory use and limit, processes, network and block I/O of running
    machines; refreshed every 2 s on a terminal, one sample otherwise."""
    import time

    from pymachined.cgroups import MachineCgroup
    from pymachined.network import machine_traffic

    for name in names or []:
        _known(name)
    from pymachined.supervise.systemd import SystemdSupervisor

    chosen = _reconciler(supervisor).supervisor
    statuses = chosen.status()
    wanted = names or sorted(n for n, s in statuses.items() if s.pid is not None)
    systemd = chosen if isinstance(chosen, SystemdSupervisor) else None
    layout = options.layout
    groups = {
        n: MachineCgroup(n, systemd.cgroup(n) if systemd else layout.cgroup_name(n)) for n in wanted
    }
    stream = sys.stdout.isatty() and not no_stream and output is Format.TABLE
    before = {n: g.stats() for n, g in groups.items()}
    started = time.monotonic()
    while True:
        time.sleep(0.5 if not stream else 2.0)
        elapsed = time.monotonic() - started
        now = {n: g.stats() for n, g in groups.items()}
        rows: list[dict[str, Any]] = []
        for name in wanted:
            old, new = before[name], now[name]
            cpu = None
            if old.cpu_ns is not None and new.cpu_ns is not None:
                cpu = round(100 * (new.cpu_ns - old.cpu_ns) / (elapsed * 1e9), 1)
            traffic = machine_traffic(options.layout, name)
            rows.append(
                {
                    "name": name,
                    "cpu_percent": cpu,
                    "memory": new.memory,
                    "memory_limit": new.memory_limit,
                    "pids": new.pids,
                    "net_rx": traffic[0] if traffic else None,
                    "net_tx": traffic[1] if traffic else None,
                    "block_io": new.io_bytes,
                    "oom_kills": new.oom_kills,
                }
            )
        if output is Format.TABLE:
            for row in rows:
                for key in ("memory", "memory_limit", "net_rx", "net_tx", "block_io"):
                    row[key] = _human(row[key]) if row[key] is not None else None
        if stream:
            typer.echo("\x1b[H\x1b[2J", nl=False)
        columns = ["name", "cpu_percent", "memory", "memory_limit", "pids", "net_rx", "net_tx"]
        _print_rows(rows, [*columns, "block_io"], output)
        if not stream:
            return
        before, started = now, time.monotonic()


@app.command("events")
def show_events(
    since: SinceOption = None,
    output: OutputOption = Format.TABLE,
    supervisor: SupervisorOption = "auto",
) -> None:
    """Lifecycle events: create, start, die (with exit code), restart, dead, oom,
    pause, unpause, stop, remove. Under systemd, what it ran is read from the
    journal."""
    import json

    from pymachined import events
    from pymachined.supervise.systemd import SystemdSupervisor, journal_events

    start = _since(since)
    skipped: list[str] = []
    found = list(events.read(options.layout, start, skipped))
    for problem in skipped:
        typer.echo(f"warning: {problem}", err=True)
    if isinstance(_reconciler(supervisor).supervisor, SystemdSupervisor):
        found = sorted(found + journal_events(start), key=lambda e: str(e["time"]))
    if output is Format.YAML:
        _print_data(list(found), output)
        return
    for event in found:
        if output is Format.JSON:
            typer.echo(json.dumps(event, sort_keys=True))
        else:
            extra = " ".join(
                f"{k}={v}"
                for k, v in sorted(event.items())
                if k not in ("time", "machine", "event")
            )
            typer.echo(f"{event['time']}  {event['machine']}  {event['event']}  {extra}".rstrip())


# ---------------------------------------------------------------------------
# Boot


DEFAULT_SPEC_DIR = Path("/etc/pymachine/specs")


def _systemd_host() -> None:
    """Refuse unless systemd is PID 1 and the root is /."""
    from pymachined.reconcile import choose_supervisor

    choose_supervisor(options.layout, "systemd")


@app.command()
def install(
    spec_dir: Annotated[
        Path, typer.Argument(help="The spec directory to apply at boot.")
    ] = DEFAULT_SPEC_DIR,
    watch: Annotated[
        bool, typer.Option("--watch", help="Also apply whenever files in it change.")
    ] = False,
) -> None:
    """Install and enable pymachine-apply.service: it applies SPEC_DIR at boot,
    before machines.target, from cached images (no network needed)."""
    from pymachined import commands, files, run
    from pymachined.reconcile import program
    from pymachined.render import APPLY_PATH_UNIT, APPLY_UNIT, apply_unit_files
    from pymachined.resources import data_dir

    _systemd_host()
    spec_dir = spec_dir.resolve()
    spec_set = _spec_set([spec_dir])
    rendered = apply_unit_files(
        PurePosixPath(spec_dir), options.layout, data_dir("templates"), program(), watch=watch
    )
    for file in rendered:
        files.atomic_write(Path(file.path), file.content, file.mode)
    stale = Path(options.layout.unit_dir) / APPLY_PATH_UNIT
    units = [APPLY_UNIT, APPLY_PATH_UNIT] if watch else [APPLY_UNIT]
    if not watch and stale.exists():
        run.run(commands.systemctl_argv("disable", [APPLY_PATH_UNIT], "--no-reload", "--now"))
        _remove_owned(stale)
    run.run(commands.systemctl_argv("enable", units, "--no-reload"))
    run.run(commands.daemon_reload_argv())
    if watch:
        run.run(commands.systemctl_argv("start", [APPLY_PATH_UNIT]))
    machines = _plural(len(spec_set.machines), "machine")
    typer.echo(f"installed {', '.join(units)}: applies {spec_dir} ({machines}) at boot")


def _remove_owned(path: Path) -> None:
    from pymachined.execute import remove_owned_file

    remove_owned_file(path)


@app.command()
def uninstall() -> None:
    """Disable and remove pymachine-apply.service (and its .path unit); the
    machines' own units stay."""
    from pymachined import commands, run
    from pymachined.render import APPLY_PATH_UNIT, APPLY_UNIT

    _systemd_host()
    present = [
        u for u in (APPLY_PATH_UNIT, APPLY_UNIT) if (Path(options.layout.unit_dir) / u).exists()
    ]
    if not present:
        typer.echo("nothing to uninstall")
        return
    run.run(commands.systemctl_argv("disable", present, "--no-reload", "--now"))
    for unit in present:
        _remove_owned(Path(options.layout.unit_dir) / unit)
    run.run(commands.daemon_reload_argv())
    typer.echo(f"uninstalled {', '.join(present)}")


# Networks

network_app = typer.Typer(help="List and inspect networks.", no_args_is_help=True)
app.add_typer(network_app, name="network")


def _network_documents() -> list[dict[str, Any]]:
    """Every recorded network with its machines, as plain data."""
    from pymachined import netplan, network
    from pymachined.state import StateStore

    store = StateStore(options.layout)
    machines = store.all()
    out = []
    for name, record in store.networks().items():
        spec = record.spec
        members = [
            {
                "name": m.name,
                "address": m.address,
                "interface": netplan.veth_name(options.layout, m.name),
                "attached": network.netns_exists(options.layout, m.name),
            }
            for m in machines.values()
            if m.network == name and m.address is not None
        ]
        out.append(
            {
                "name": name,
                "bridge": record.bridge,
                "bridge_up": network.link_exists(record.bridge),
                "subnet": spec.get("subnet"),
                "subnet6": spec.get("subnet6"),
                "gateway": spec.get("gateway") or _first_host(str(spec.get("subnet"))),
                "nat": spec.get("nat"),
                "machines": sorted(members, key=lambda m: str(m["name"])),
                "created": record.created,
                "history": list(record.history),
            }
        )
    return out


def _first_host(subnet: str) -> str:
    import ipaddress

    return str(next(ipaddress.ip_network(subnet).hosts()))


@network_app.command("ls")
def network_ls(output: OutputOption = Format.TABLE) -> None:
    """List networks: name, bridge, subnet, gateway, machines."""
    rows = [
        {**doc, "machines": ", ".join(f"{m['name']}={m['address']}" for m in doc["machines"])}
        if output is Format.TABLE
        else doc
        for doc in _network_documents()
    ]
    _print_rows(rows, ["name", "bridge", "subnet", "subnet6", "gateway", "machines"], output)


@network_app.command("inspect")
def network_inspect(
    name: NetworkArg,
    output: Annotated[Format, typer.Option("--output", "-o", help="json or yaml.")] = Format.JSON,
) -> None:
    """One document: the network's subnet, bridge, gateway and machines with addresses."""
    for doc in _network_documents():
        if doc["name"] == name:
            _print_data(doc, Format.JSON if output is Format.TABLE else output)
            return
    raise PymachineError(f"no network named {name!r}", hint="see pymachine network ls")


@network_app.command("rm")
def network_rm(name: NetworkArg) -> None:
    """Remove a network pymachine made (its bridge, rules and record); its
    machines must be gone first."""
    from pymachined.execute import remove_network
    from pymachined.state import StateStore

    with _host_lock(None):
        remove_network(options.layout, StateStore(options.layout), name)
    typer.echo(f"removed network {name}")


# ---------------------------------------------------------------------------
# Images

image_app = typer.Typer(help="Build, list and remove images.", no_args_is_help=True)
app.add_typer(image_app, name="image")


def _store() -> ImageStore:
    from pymachined.images import ImageStore
    from pymachined.resources import data_dir

    return ImageStore(options.layout, data_dir("templates"))


@image_app.command("build")
def image_build(
    target: Annotated[
        str, typer.Argument(help="An image name, or a spec file or directory to build for.")
    ],
    specs: Annotated[
        list[Path] | None,
        typer.Option("--specs", "-f", help="Spec files or directories declaring images."),
    ] = None,
) -> None:
    """Build an image (and its parents), or every image a spec path needs."""
    from pymachined.recipes import layers, machine_layers

    store = _store()
    salts = store.salts()
    path = Path(target)
    if path.exists():
        spec_set = _spec_set([path, *(specs or [])])
        declared = sorted(name for kind, name in spec_set.sources if kind == "image")
        plans = [layers(spec_set, name, salts) for name in declared]
        plans += [machine_layers(spec_set, m, salts) for m in spec_set.machines.values()]
        if not plans:
            raise PymachineError(f"{target} declares no images or machines")
    else:
        spec_set = _spec_set(list(specs or []))
        if target not in spec_set.images:
            known = ", ".join(sorted(spec_set.images))
            raise PymachineError(f"unknown image {target!r}", hint=f"images: {known}")
        plans = [layers(spec_set, target, salts)]
    for plan in plans:
        top = store.ensure(plan)[0]
        typer.echo(f"{top.name} {top.key}")


@image_app.command("ls")
def image_ls(output: OutputOption = Format.TABLE) -> None:
    """List built images: name, key, size, when built, which machines use them."""
    from pymachined import rootfs
    from pymachined.files import tree_usage

    store = _store()
    users = rootfs.users(options.layout)
    rows: list[dict[str, Any]] = [
        {
            "name": record.name,
            "key": record.key,
            "parent": record.parent,
            "size": tree_usage(record.tree),
            "built": record.built,
            "used_by": users.get(record.key, []),
        }
        for record in store.records()
    ]
    if output is Format.TABLE:
        for row in rows:
            row["size"] = _human(row["size"])
    _print_rows(rows, ["name", "key", "size", "built", "used_by"], output)


def _resolve_images(store: ImageStore, names: list[str]) -> list[str]:
    records = store.records()
    keys: list[str] = []
    for name in names:
        found = [r.key for r in records if name in (r.key, r.name)]
        if not found:
            raise PymachineError(f"no image {name!r} in the cache", hint="see pymachine image ls")
        keys += found
    return keys


@image_app.command("rm")
def image_rm(
    names: Annotated[
        list[str], typer.Argument(help="Image names or keys.", callback=_name_check("image"))
    ],
) -> None:
    """Remove images no machine uses."""
    from pymachined import rootfs

    store = _store()
    with _host_lock(None):  # an apply may be about to make a root from one of them
        users = rootfs.users(options.layout)
        keys = _resolve_images(store, names)
        children = {r.parent: r.key for r in store.records() if r.parent}
        for key in keys:
            if users.get(key):
                raise PymachineError(
                    f"image {key} is used by {', '.join(users[key])}",
                    hint="remove those machines first",
                )
            if key in children and children[key] not in keys:
                raise PymachineError(
                    f"image {key} is the parent of image {children[key]}",
                    hint=f"remove {children[key]} too",
                )
        for key in sorted(keys, key=lambda k: len(store.chain(k)), reverse=True):
            store.remove(key)
            typer.echo(f"removed {key}")


@image_app.command("prune")
def image_prune(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
) -> None:
    """Remove every image no machine uses (listed first)."""
    _prune([], yes, "auto")


def _prune(machines: list[str], yes: bool, supervisor: str) -> None:
    """Remove machines and then every image no remaining machine uses, after
    listing them and asking (or --yes)."""
    from pymachined import rootfs
    from pymachined.execute import remove_machine
    from pymachined.state import StateStore

    store = _store()
    users = rootfs.users(options.layout)
    for name in machines:
        users = {k: [m for m in v if m != name] for k, v in users.items()}
    unused = [r for r in store.records() if not users.get(r.key)]
    if not machines and not unused:
        typer.echo("no unused images")
        return
    for name in machines:
        typer.echo(f"stopped, undeclared machine: {name}")
    for record in unused:
        typer.echo(f"unused: {record.name} {record.key}")
    if not yes:
        if not sys.stdin.isatty():
            raise PymachineError("not removing without confirmation", hint="add --yes")
        typer.confirm(f"remove {len(machines)} machines and {len(unused)} images?", abort=True)
    with _host_lock(None):  # an apply may be about to make a root from an image
        if machines:
            running = _reconciler(supervisor).supervisor
            for name in machines:
                remove_machine(options.layout, StateStore(options.layout), running, name)
                typer.echo(f"removed machine {name}")
            running.commit({}, reload=True)
        users = rootfs.users(options.layout)  # again: an apply may have run meanwhile
        for record in sorted(unused, key=lambda r: len(store.chain(r.key)), reverse=True):
            if users.get(record.key):
                typer.echo(f"kept {record.key}: now used by {', '.join(users[record.key])}")
                continue
            store.remove(record.key)
            typer.echo(f"removed {record.key}")


@app.command()
def prune(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Specs: stopped machines they do not declare are removed too."),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
    supervisor: SupervisorOption = "auto",
) -> None:
    """Remove stopped machines no spec declares (given PATH) and images no machine uses."""
    from pymachined.state import StateStore

    doomed: list[str] = []
    if paths:
        declared = _spec_set(paths).machines
        if not declared:
            raise PymachineError(
                f"{', '.join(map(str, paths))} declares no machines; refusing to prune them all",
                hint="check the path; to remove one machine, use pymachine destroy",
            )
        from pymachined.supervise.base import LIVE

        statuses = _reconciler(supervisor).supervisor.status()
        for name in StateStore(options.layout).names():
            status = statuses.get(name)
            # A machine between two runs (restarting) is not a stopped one.
            running = status is not None and (status.pid is not None or status.state in LIVE)
            if name not in declared and not running:
                doomed.append(name)
    _prune(doomed, yes, supervisor)


@app.command()
def df(output: OutputOption = Format.TABLE) -> None:
    """Disk used by images and by machines' own layers, shared and unique."""
    from pymachined import rootfs
    from pymachined.files import tree_usage

    layout = options.layout
    store = _store()
    users = rootfs.users(layout)
    rows: list[dict[str, Any]] = []
    for record in store.records():
        size = tree_usage(record.tree)
        rows.append(
            {
                "type": "image",
                "name": record.name,
                "key": record.key,
                "size": size,
                "users": len(users.get(record.key, [])),
            }
        )
    machines = Path(layout.machines_dir)
    for entry in sorted(machines.iterdir()) if machines.is_dir() else []:
        root = rootfs.read(layout, entry.name)
        if root is None:
            continue
        own = entry / ("rootfs" if root.mode.value == "copy" else "upper")
        rows.append(
            {
                "type": "machine",
                "name": entry.name,
                "key": root.layers[0],
                "size": tree_usage(own),
                "users": 1,
            }
        )
    if output is Format.TABLE:
        images = sum(r["size"] for r in rows if r["type"] == "image")
        shared = sum(r["size"] for r in rows if r["type"] == "image" and r["users"])
        own = sum(r["size"] for r in rows if r["type"] == "machine")
        typer.echo(
            f"images: {_human(images)} ({_human(shared)} in use, "
            f"{_human(images - shared)} reclaimable by image prune)"
        )
        typer.echo(f"machines' own layers: {_human(own)}")
        typer.echo()
        for row in rows:
            row["size"] = _human(row["size"])
    _print_rows(rows, ["type", "name", "key", "size", "users"], output)


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
    except Exception as error:  # a bug, unless the host failed: say which
        if debug:
            traceback.print_exc()
        if isinstance(error, OSError) and error.errno in HOST_ERRNOS:
            sys.exit(_report(host_error(error)))
        typer.echo(f"error: internal error: {type(error).__name__}: {error}", err=True)
        typer.echo("hint: run again with --debug for the traceback, and report it", err=True)
        sys.exit(1)
