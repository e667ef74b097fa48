"""The operator's command line (Typer): parses options, calls one library
function per command (mostly in ``pymachined.verbs``), and prints what it
returns through ``pymachined.output``, and errors for people. It reads and
changes nothing on the host itself.

Heavy modules (jinja2, the spec models, pyroute2, systemd) are imported inside
the commands that need them, so ``pymachine --help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pymachined import __version__
from pymachined.core import wire
from pymachined.core.layout import Layout
from pymachined.errors import HOST_ERRNOS, PymachineError, UsageError, host_error
from pymachined.output import Format

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from pymachined.core.actions import Step
    from pymachined.core.desired import Desired
    from pymachined.core.validate import SpecSet
    from pymachined.images import ImageStore
    from pymachined.reconcile import Reconciler
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
        from pymachined.core.spec import check_name

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
    from pymachined.verbs.build import spec_set

    return spec_set(options.layout, paths)


PathsArg = Annotated[
    list[Path], typer.Argument(help="Spec files or directories (searched recursively).")
]


@app.command()
def validate(paths: PathsArg) -> None:
    """Check spec files and report every problem with its file, line and field."""
    from pymachined.output import plural

    spec_set = _spec_set(paths)
    files = len({located.document.file for located in spec_set.sources.values()})
    images = len(spec_set.sources) - len(spec_set.machines) - len(spec_set.networks)
    counts = [
        plural(len(spec_set.machines), "machine"),
        plural(len(spec_set.networks), "network"),
        plural(images, "image"),
    ]
    typer.echo(f"ok: {', '.join(counts)} in {plural(files, 'file')}")


@app.command()
def schema() -> None:
    """Print the JSON Schema of spec documents, for editors and CI."""
    import json

    from pymachined.core.schema import json_schema

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
    from pymachined.reconcile import rendered_files
    from pymachined.resources import data_dir

    spec_set = _spec_set([path])
    machine = spec_set.machines.get(name)
    if machine is None:
        known = ", ".join(sorted(spec_set.machines)) or "none"
        raise PymachineError(
            f"no machine named {name!r} in {path}", hint=f"machines declared: {known}"
        )
    files = rendered_files(options.layout, spec_set, machine, data_dir("templates"))
    for index, rendered in enumerate(files):
        if index:
            typer.echo()
        typer.echo(f"### {rendered.path}")
        typer.echo(rendered.content, nl=False)


# ---------------------------------------------------------------------------
# Output


OutputOption = Annotated[Format, typer.Option("--output", "-o", help="table, json or yaml.")]
DocumentOption = Annotated[Format, typer.Option("--output", "-o", help="json or yaml.")]


def _document_format(fmt: Format) -> Format:
    """A document prints as JSON unless YAML is asked for (a table is JSON)."""
    return Format.JSON if fmt is Format.TABLE else fmt


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
) -> tuple[dict[str, Desired], list[Step], list[str]]:
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


def _show_plan(desired: dict[str, Desired], actions: list[Step], fmt: Format) -> None:
    from pymachined import output
    from pymachined.core.plan import warnings

    for warning in warnings(desired, actions):
        typer.echo(f"warning: {warning}", err=True)
    if fmt is not Format.TABLE:
        output.data([a.as_json() for a in actions], fmt)
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


def _refuse_silent_discards(actions: list[Step]) -> None:
    """Without a terminal to ask, an apply goes ahead (scripts, units), except
    where it would throw away what a machine wrote in its root: that takes
    --yes, never the silence of a pipe or a closed stdin."""
    from pymachined.core.actions import discards_data

    losing = sorted({step.machine for step in actions if discards_data(step)})
    if losing:
        raise PymachineError(
            f"not applying without confirmation: the plan discards what "
            f"{', '.join(losing)} wrote in {'its' if len(losing) == 1 else 'their'} "
            "root (see above), and there is no terminal to ask",
            hint="run it in a terminal to be asked, or pass --yes to discard it",
        )


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
            elif not yes:
                _refuse_silent_discards(actions)
            reconciler.execute(desired, actions, lambda text: typer.echo(f"-> {text}", err=True))
        # Said by the executor before its starts; here for an apply with nothing to do.
        reconciler.supervisor.ready()
        if not problems:
            reconciler.supervisor.settled()
        if not actions:
            raise typer.Exit(1 if problems else 0)
    from pymachined.output import plural

    typer.echo(f"applied {plural(len(actions), 'change')}")
    if problems:
        raise PymachineError(
            f"{len(problems)} left as they are, each with a record that cannot be "
            "read (see the errors above)",
            hint="inspect the files named above, repair or remove them, then apply again",
        )


@app.command("ls")
def list_machines(
    output: OutputOption = Format.TABLE, supervisor: SupervisorOption = "auto"
) -> None:
    """List machines: name, state, image, address, uptime, restarts."""
    from pymachined import output as show
    from pymachined.verbs import inspect

    reconciler = _reconciler(supervisor)
    listing = inspect.machines(options.layout, reconciler.images, reconciler.supervisor)
    for name, problem in listing.unreadable.items():
        show.error(f"{name}: {problem}")
    show.rows(listing.rows, ["name", "state", "image", "address", "uptime", "restarts"], output)
    if listing.unreadable:
        raise typer.Exit(1)


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
    from pymachined.verbs import known

    start_recorded_forwarders(options.layout, known(options.layout, name))


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
    if not yes:
        from pymachined.core.actions import discarded

        what = discarded(verbs.written(name))
        if sys.stdin.isatty():
            typer.confirm(
                f"destroy {name}" + (f", discarding {what}?" if what else "?"), abort=True
            )
        elif what:
            raise PymachineError(
                f"not destroying {name} without confirmation: that discards {what}, "
                "and there is no terminal to ask",
                hint="run it in a terminal to be asked, or pass --yes",
            )
    verbs.destroy(name)
    typer.echo(f"destroyed {name}")


# ---------------------------------------------------------------------------
# Operating machines


@app.command()
def inspect(
    name: NameArg,
    output: DocumentOption = Format.JSON,
    supervisor: SupervisorOption = "auto",
) -> None:
    """One document: the spec as applied, the command line it runs with,
    its state and exit code, root layers, address, supervisor process, resource
    limits and user namespace."""
    from pymachined import output as show
    from pymachined.verbs import inspect

    document = inspect.machine(options.layout, _reconciler(supervisor).supervisor, name)
    show.data(document, _document_format(output))


SinceOption = Annotated[
    str | None,
    typer.Option(
        help="Only from this long ago on (10m, 1h30m), or from a UTC time (2026-11-28T10:00:00)."
    ),
]


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
    from pymachined import output as show
    from pymachined.verbs import logs as machine_logs

    chosen = _reconciler(supervisor).supervisor
    if journal:
        code = machine_logs.journal(options.layout, chosen, name, lines, since, follow, timestamps)
        raise typer.Exit(code)
    found = machine_logs.output(options.layout, chosen, name, lines, since, follow)
    if found is None:
        show.note(f"{name} has no output yet")
        return
    for line in found:
        show.log_line(line, timestamps)


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
    from pymachined.verbs import enter

    chosen = _reconciler(supervisor).supervisor
    return enter.enter(options.layout, chosen, name, command, user, workdir, env)


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


STATS_COLUMNS = [
    "name",
    "cpu_percent",
    "memory",
    "memory_limit",
    "pids",
    "net_rx",
    "net_tx",
    "block_io",
]
STATS_BYTES = ["memory", "memory_limit", "net_rx", "net_tx", "block_io"]


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
    from pymachined import output as show
    from pymachined.verbs.stats import samples

    stream = sys.stdout.isatty() and not no_stream and output is Format.TABLE
    chosen = _reconciler(supervisor).supervisor
    for sample in samples(options.layout, chosen, names or [], 2.0 if stream else 0.5):
        rows = show.humanized([wire.dump(u) for u in sample], STATS_BYTES, output)
        if stream:
            show.clear_screen()
        show.rows(rows, STATS_COLUMNS, output)
        if not stream:
            return


@app.command("events")
def show_events(
    since: SinceOption = None,
    output: OutputOption = Format.TABLE,
    supervisor: SupervisorOption = "auto",
) -> None:
    """Lifecycle events: create, start, die (with exit code), restart, dead, oom,
    pause, unpause, stop, remove. Under systemd, what it ran is read from the
    journal."""
    from pymachined import output as show
    from pymachined.verbs import events

    skipped: list[str] = []
    found = events.events(options.layout, _reconciler(supervisor).supervisor, since, skipped)
    for problem in skipped:
        show.warning(problem)
    show.events(found, output)


# ---------------------------------------------------------------------------
# Boot


DEFAULT_SPEC_DIR = Path("/etc/pymachine/specs")


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
    from pymachined.output import plural
    from pymachined.verbs import boot

    boot.systemd_host(options.layout)
    spec_dir = spec_dir.resolve()
    spec_set = _spec_set([spec_dir])
    units = boot.install(options.layout, spec_dir, watch)
    machines = plural(len(spec_set.machines), "machine")
    typer.echo(f"installed {', '.join(units)}: applies {spec_dir} ({machines}) at boot")


@app.command()
def uninstall() -> None:
    """Disable and remove pymachine-apply.service (and its .path unit); the
    machines' own units stay."""
    from pymachined.verbs import boot

    present = boot.uninstall(options.layout)
    typer.echo(f"uninstalled {', '.join(present)}" if present else "nothing to uninstall")


# Networks

network_app = typer.Typer(help="List and inspect networks.", no_args_is_help=True)
app.add_typer(network_app, name="network")


@network_app.command("ls")
def network_ls(output: OutputOption = Format.TABLE) -> None:
    """List networks: name, bridge, subnet, gateway, machines."""
    from pymachined import output as show
    from pymachined.verbs import inspect

    rows = [
        {**doc, "machines": ", ".join(f"{m['name']}={m['address']}" for m in doc["machines"])}
        if output is Format.TABLE
        else doc
        for doc in inspect.networks(options.layout)
    ]
    show.rows(rows, ["name", "bridge", "subnet", "subnet6", "gateway", "machines"], output)


@network_app.command("inspect")
def network_inspect(name: NetworkArg, output: DocumentOption = Format.JSON) -> None:
    """One document: the network's subnet, bridge, gateway and machines with addresses."""
    from pymachined import output as show
    from pymachined.verbs import inspect

    show.data(inspect.network_document(options.layout, name), _document_format(output))


@network_app.command("rm")
def network_rm(name: NetworkArg) -> None:
    """Remove a network pymachine made (its bridge, rules and record); its
    machines must be gone first."""
    from pymachined.execute import remove_network
    from pymachined.state import StateStore

    with _host_lock(None):
        remove_network(options.layout, StateStore(options.layout), name)
    typer.echo(f"removed network {name}")


# Volumes

volume_app = typer.Typer(
    help="List, inspect, remove, export and import volumes.", no_args_is_help=True
)
app.add_typer(volume_app, name="volume")
VolumeArg = Annotated[str, typer.Argument(help="The volume.", callback=_name_check("volume"))]


@volume_app.command("ls")
def volume_ls(output: OutputOption = Format.TABLE) -> None:
    """List volumes: name, size, owner, the machines using them."""
    from pymachined import output as show
    from pymachined.verbs import volumes

    rows = [
        {**doc, "used_by": ", ".join(doc["used_by"])} if output is Format.TABLE else doc
        for doc in volumes.listing(options.layout)
    ]
    show.rows(
        show.humanized(rows, ["size"], output),
        ["name", "size", "owner", "used_by", "created"],
        output,
    )


@volume_app.command("inspect")
def volume_inspect(name: VolumeArg, output: DocumentOption = Format.JSON) -> None:
    """One document: the volume's labels, owner, size, path, users and seed."""
    from pymachined import output as show
    from pymachined.verbs import volumes

    show.data(volumes.document(options.layout, name), _document_format(output))


@volume_app.command("rm")
def volume_rm(name: VolumeArg, yes: YesOption = False) -> None:
    """Remove a volume and everything in it; refused while a machine uses it.
    Asks first in a terminal; without one, only --yes removes it."""
    from pymachined.core.sizes import human_size
    from pymachined.verbs import volumes

    with _host_lock(None):
        doc = volumes.document(options.layout, name)
        if not yes:
            question = f"remove volume {name} and the {human_size(doc['size'])} it holds?"
            if not sys.stdin.isatty():
                raise PymachineError(
                    f"not removing volume {name} without confirmation: there is no terminal to ask",
                    hint="pass --yes",
                )
            typer.confirm(question, abort=True)
        volumes.remove(options.layout, name)
    typer.echo(f"removed volume {name}")


ArchiveArg = Annotated[str, typer.Argument(help="The tar file; - for standard input or output.")]


@volume_app.command("export")
def volume_export(name: VolumeArg, file: ArchiveArg) -> None:
    """Write a volume's data to a tar file: owners as its machines see them,
    modes, xattrs and ACLs, hard links, holes. Stop the machines writing to
    it first for a copy of one moment."""
    from pymachined.verbs import volumes

    if file == "-" and sys.stdout.isatty():
        raise PymachineError(
            "not writing an archive to a terminal",
            hint=f"redirect it (pymachine volume export {name} - > {name}.tar) or name a file",
        )
    volumes.export(options.layout, name, file)
    if file != "-":
        typer.echo(f"exported volume {name} to {file}", err=True)


@volume_app.command("import")
def volume_import(name: VolumeArg, file: ArchiveArg, supervisor: SupervisorOption = "auto") -> None:
    """Fill an empty volume from a tar file (as volume export writes), making
    the volume if it has none; a volume that holds data is never written over."""
    from pymachined.verbs import volumes

    if file == "-" and sys.stdin.isatty():
        raise PymachineError(
            "not reading an archive from a terminal",
            hint=f"redirect one in (pymachine volume import {name} - < {name}.tar) or name a file",
        )
    with _host_lock(None):
        statuses = _reconciler(supervisor).supervisor.status()
        running = [n for n, status in statuses.items() if status.pid is not None]
        volumes.import_archive(options.layout, name, file, running)
    typer.echo(f"imported {'standard input' if file == '-' else file} into volume {name}")


@volume_app.command("prune")
def volume_prune(
    paths: Annotated[list[Path], typer.Argument(help="The specs: the volumes they declare stay.")],
    yes: YesOption = False,
) -> None:
    """Remove the volumes PATH does not declare and no machine uses, listing
    them first; asks, or --yes (without a terminal, only --yes removes)."""
    from pymachined.verbs import volumes

    declared = _spec_set(paths).volumes
    with _host_lock(None):
        doomed = volumes.prunable(options.layout, declared)
        if not doomed:
            typer.echo("nothing to prune: every volume is declared or in use")
            return
        for name in doomed:
            typer.echo(f"  remove volume {name}")
        if not yes:
            if not sys.stdin.isatty():
                raise PymachineError(
                    "not removing volumes without confirmation: there is no terminal to ask",
                    hint="pass --yes",
                )
            typer.confirm(f"remove {len(doomed)} volume(s) and everything in them?", abort=True)
        for name in doomed:
            volumes.remove(options.layout, name)
            typer.echo(f"removed volume {name}")


# ---------------------------------------------------------------------------
# Images

image_app = typer.Typer(help="Build, list and remove images.", no_args_is_help=True)
app.add_typer(image_app, name="image")


def _store() -> ImageStore:
    from pymachined.images import ImageStore
    from pymachined.resources import data_dir

    return ImageStore(options.layout, data_dir("templates"))


def _waiting(message: str) -> None:
    typer.echo(message, err=True)


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
    from pymachined.verbs.build import build

    for top in build(options.layout, _store(), target, specs or []):
        typer.echo(f"{top.name} {top.key}")


@image_app.command("ls")
def image_ls(output: OutputOption = Format.TABLE) -> None:
    """List built images: name, key, size, when built, which machines use them."""
    from pymachined import output as show
    from pymachined.verbs import disk

    rows = show.humanized(disk.images(options.layout, _store()), ["size"], output)
    show.rows(rows, ["name", "key", "size", "built", "used_by"], output)


@image_app.command("rm")
def image_rm(
    names: Annotated[
        list[str], typer.Argument(help="Image names or keys.", callback=_name_check("image"))
    ],
) -> None:
    """Remove images no machine uses."""
    from pymachined import output as show
    from pymachined.verbs import disk

    disk.remove_images(options.layout, _store(), names, show.line, _waiting)


@image_app.command("prune")
def image_prune(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
) -> None:
    """Remove every image no machine uses (listed first)."""
    _prune([], yes, "auto")


def _prune(machines: list[str], yes: bool, supervisor: str) -> None:
    """Remove machines and then every image no remaining machine uses, after
    listing them and asking (or --yes)."""
    from pymachined import output as show
    from pymachined.verbs import disk

    store = _store()
    plan = disk.prune_plan(options.layout, store, machines)
    if plan.empty:
        show.line("no unused images")
        return
    for name in plan.machines:
        show.line(f"stopped, undeclared machine: {name}")
    for record in plan.images:
        show.line(f"unused: {record.name} {record.key}")
    if not yes:
        if not sys.stdin.isatty():
            raise PymachineError("not removing without confirmation", hint="add --yes")
        typer.confirm(
            f"remove {len(plan.machines)} machines and {len(plan.images)} images?", abort=True
        )
    running = _reconciler(supervisor).supervisor if plan.machines else None
    disk.prune(options.layout, store, running, plan, show.line, _waiting)


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
    from pymachined.verbs import disk

    doomed: list[str] = []
    if paths:
        declared = _spec_set(paths).machines
        if not declared:
            raise PymachineError(
                f"{', '.join(map(str, paths))} declares no machines; refusing to prune them all",
                hint="check the path; to remove one machine, use pymachine destroy",
            )
        statuses = _reconciler(supervisor).supervisor.status()
        doomed = disk.stopped_undeclared(options.layout, statuses, declared)
    _prune(doomed, yes, supervisor)


@app.command()
def df(
    output: OutputOption = Format.TABLE,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also a row for each volume.")
    ] = False,
) -> None:
    """Disk used by images, by machines' own layers and by volumes."""
    from pymachined import output as show
    from pymachined.verbs import disk

    rows = disk.usage(options.layout, _store())
    if output is Format.TABLE:
        totals = disk.totals(rows)
        count = sum(1 for r in rows if r["type"] == "volume")
        show.line(
            f"images: {show.human(totals.images)} ({show.human(totals.shared)} in use, "
            f"{show.human(totals.reclaimable)} reclaimable by image prune)"
        )
        show.line(f"machines' own layers: {show.human(totals.own)}")
        show.line(f"volumes: {show.human(totals.volumes)} in {show.plural(count, 'volume')}")
        show.line()
    if not verbose:
        rows = [r for r in rows if r["type"] != "volume"]
    show.rows(
        show.humanized(rows, ["size"], output), ["type", "name", "key", "size", "users"], output
    )


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
