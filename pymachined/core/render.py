"""Rendering a machine's files with Jinja2. Pure.

The environment is strict: an undefined name is an error, and every value that
reaches a file must pass the file kind's escaping filter (``unit`` or
``nspawn``), or rendering fails. User text is only ever a value passed to a
template, never compiled as one.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2

from pymachined.core import units
from pymachined.core.idshift import RANGE
from pymachined.core.layout import Layout
from pymachined.core.limits import DEVICE_ALLOW
from pymachined.core.spec import Bind, Machine, MachineState, RootfsMode

NSPAWN_BINARY = "/usr/bin/systemd-nspawn"
PROGRAM = ("pymachine",)
"""How a unit runs pymachine when the caller names no interpreter: systemd finds
a bare name in its fixed search path (/usr/local/bin, /usr/bin, …)."""
NSENTER_BINARY = "/usr/bin/nsenter"
MARKER = "pymachine-owner: managed by pymachine; do not edit"


class Escaped(str):
    """Text that has passed an escaping filter and may enter a rendered file."""

    __slots__ = ()


def _finalize(value: Any) -> Any:
    """Refuse any value that did not pass an escaping filter."""
    if isinstance(value, Escaped):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return value
    raise units.UnsafeValue(
        f"template value {value!r} reached a file without the unit or nspawn filter"
    )


def _unit_filter(value: Any, exec: bool = False) -> Escaped:
    if isinstance(value, list | tuple):
        return Escaped(units.unit_words(value, exec_line=exec))
    return Escaped(units.unit_value(value))


def _nspawn_filter(value: Any) -> Escaped:
    if isinstance(value, list | tuple):
        return Escaped(units.nspawn_words(value))
    text = str(value)
    units.refuse_control(text)
    if text.endswith("\\"):
        raise units.UnsafeValue(f"refusing a trailing backslash in an .nspawn file: {text!r}")
    return Escaped(text)


def _sh_filter(value: Any) -> Escaped:
    """Shell words for the build scripts, each quoted for sh."""
    words = value if isinstance(value, list | tuple) else [value]
    return Escaped(" ".join(shlex.quote(units.refuse_control(str(w))) for w in words))


@cache
def environment(template_dir: Path) -> jinja2.Environment:
    """The one Jinja2 environment pymachine renders with."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        finalize=_finalize,
    )
    env.filters["unit"] = _unit_filter
    env.filters["nspawn"] = _nspawn_filter
    env.filters["sh"] = _sh_filter
    return env


@dataclass(frozen=True)
class RenderedFile:
    """A file pymachine writes on the host: its path, content and mode."""

    path: PurePosixPath
    content: str
    mode: int = 0o644


def all_binds(machine: Machine, layout: Layout) -> list[Bind]:
    """A machine's binds, then its volumes as binds of their data directories,
    ID-mapped (so that inside the machine a volume's files have the machine's
    own IDs, and are stored with them, whatever its range)."""
    volumes = [
        Bind(
            source=str(layout.volume_data(v.name)),
            target=v.target,
            read_only=v.read_only,
            idmap=True,
        )
        for v in machine.volumes
    ]
    return [*machine.binds, *volumes]


def user_namespace(machine: Machine, uid_base: int | None) -> tuple[str, str]:
    """nspawn's PrivateUsers= and PrivateUsersOwnership= for a machine whose
    range is at uid_base: its own range, ownership left alone, since
    pymachine hands nspawn an overlay root already owned by it (a copied root
    nspawn maps or shifts itself: ``auto``). Without a range chosen (a
    preview), nspawn picks one."""
    if not machine.security.private_users:
        return "no", "off"
    if uid_base is None:
        return "pick", "auto"
    ownership = "auto" if machine.rootfs is RootfsMode.COPY else "off"
    return f"{uid_base}:{RANGE}", ownership


def nspawn_context(machine: Machine, layout: Layout, uid_base: int | None = None) -> dict[str, Any]:
    """The values of a machine's .nspawn file, as plain data, for its
    user-namespace range at uid_base.
    Binds are named by their staging paths, where pymachine mounts each source,
    opened without following a symlink, before every start."""
    security = machine.security
    private_users, users_ownership = user_namespace(machine, uid_base)
    filters = []
    if security.seccomp.allow:
        filters.append(" ".join(security.seccomp.allow))
    if security.seccomp.deny:
        filters.append("~" + " ".join(security.seccomp.deny))
    return {
        "marker": Escaped(MARKER),
        "name": machine.name,
        "boot": machine.boot,
        "kill_signal": machine.kill_signal,
        "parameters": list(machine.command or []),
        "environment": [f"{k}={v}" for k, v in sorted(machine.environment.items())],
        "user": machine.user,
        "workdir": machine.workdir,
        "hostname": machine.hostname,
        "private_users": private_users,
        "users_ownership": users_ownership,
        "capability_add": " ".join(sorted(set(security.capabilities.add))),
        "capability_drop": " ".join(sorted(set(security.capabilities.drop))),
        "no_new_privileges": security.no_new_privileges,
        "syscall_filter": filters,
        "read_only": machine.read_only,
        "binds": [
            {
                "spec": (
                    f"{units.nspawn_path(str(layout.bind_staging(machine.name, index)))}"
                    f":{units.nspawn_path(b.target)}"
                    + (":idmap" if b.idmap and security.private_users else "")
                ),
                "read_only": b.read_only,
            }
            for index, b in enumerate(all_binds(machine, layout))
        ],
        "tmpfs": [
            # Writable by every user, as /tmp is (and as docker mounts a tmpfs).
            t.path + ":mode=1777" + (f",size={t.size}" if t.size is not None else "")
            for t in machine.tmpfs
        ],
        # A declared network's namespace is entered before nspawn starts, so
        # nspawn itself makes a private one only for network: none.
        "private_network": machine.network == "none",
        # A machine on a declared network asks its network's resolver, which
        # pymachine writes into its /etc/resolv.conf at every start: nspawn
        # leaves that file alone. The host's own serve host and none.
        "resolv_conf": None if machine.network in ("host", "none") else "off",
    }


def nspawn_run_argv(machine: Machine, layout: Layout, uid_base: int | None = None) -> list[str]:
    """The systemd-nspawn command line pymachined runs a machine with: the same
    settings as its .nspawn file (from the same context), as options, since a
    file under --root is not where nspawn looks for settings."""
    context = nspawn_context(machine, layout, uid_base)
    argv = [
        NSPAWN_BINARY,
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--console=pipe",
        f"--machine={machine.name}",
        f"--directory={layout.rootfs(machine.name)}",
        f"--private-users={context['private_users']}",
        f"--private-users-ownership={context['users_ownership']}",
    ]
    argv += [f"--setenv={assignment}" for assignment in context["environment"]]
    if context["user"]:
        argv.append(f"--user={context['user']}")
    if context["workdir"]:
        argv.append(f"--chdir={context['workdir']}")
    if context["hostname"]:
        argv.append(f"--hostname={context['hostname']}")
    if context["capability_add"]:
        argv.append(f"--capability={context['capability_add'].replace(' ', ',')}")
    if context["capability_drop"]:
        argv.append(f"--drop-capability={context['capability_drop'].replace(' ', ',')}")
    if context["no_new_privileges"]:
        argv.append("--no-new-privileges=yes")
    argv += [f"--system-call-filter={f}" for f in context["syscall_filter"]]
    if context["read_only"]:
        argv.append("--read-only")
    for bind in context["binds"]:
        argv.append(f"--bind-ro={bind['spec']}" if bind["read_only"] else f"--bind={bind['spec']}")
    argv += [f"--tmpfs={t}" for t in context["tmpfs"]]
    if machine.network == "none":
        argv.append("--private-network")
    if context["resolv_conf"]:
        argv.append(f"--resolv-conf={context['resolv_conf']}")
    # Without it, nspawn answers SIGTERM by SIGKILLing a command's payload.
    argv.append(f"--kill-signal={context['kill_signal']}")
    if machine.boot:
        argv.append("--boot")
    else:
        argv += ["--", *context["parameters"]]
    if machine.network in ("host", "none"):
        return argv
    # nspawn starts inside the machine's namespace rather than joining it with
    # --network-namespace-path, which nspawn 252 does after entering the user
    # namespace, where joining is not permitted.
    return [NSENTER_BINARY, f"--net={layout.netns_path(machine.name)}", "--", *argv]


def nspawn_exec_argv(machine: Machine, layout: Layout) -> list[str]:
    """The systemd-nspawn command line of a machine's unit; its settings come from
    the .nspawn file nspawn reads from the trusted /etc/systemd/nspawn."""
    argv = [
        NSPAWN_BINARY,
        "--quiet",
        "--keep-unit",
        "--register=yes",
        f"--machine={machine.name}",
        f"--directory={layout.rootfs(machine.name)}",
    ]
    if machine.network in ("host", "none"):
        return argv
    # Started inside the machine's namespace, as under pymachined (see there).
    return [NSENTER_BINARY, f"--net={layout.netns_path(machine.name)}", "--", *argv]


def _timespan(seconds: float) -> str:
    """A systemd time span: whole seconds as "30s", anything finer in ms."""
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


APPLY_UNIT = "pymachine-apply.service"
APPLY_PATH_UNIT = "pymachine-apply.path"


def program_argv(program: Sequence[str], layout: Layout, *args: str) -> list[str]:
    """A pymachine command line for a unit: the program, the layout's root, args."""
    return [*program, f"--root={layout.root}", *args]


def service_context(
    machine: Machine, layout: Layout, program: Sequence[str] = PROGRAM
) -> dict[str, Any]:
    """The values of a machine's systemd unit, as plain data. ``program`` runs
    pymachine (the unit prepares the machine's root and network with it before
    starting, and its port forwarders after)."""
    resources = machine.resources
    return {
        "marker": Escaped(MARKER),
        "name": machine.name,
        "dependencies": [layout.unit_name(d) for d in machine.depends_on],
        # Ordered after the boot apply, which says when the settings are in place.
        "apply_unit": APPLY_UNIT,
        "machine_dir": str(layout.machine_dir(machine.name)),
        "exec_start_pre": program_argv(program, layout, "prepare", "--", machine.name),
        "exec_start": nspawn_exec_argv(machine, layout),
        # IPv6 port forwarders run in the unit, started once the machine is up.
        "exec_start_post": (
            program_argv(program, layout, "forward-ports", "--", machine.name)
            if machine.ports and machine.network not in ("host", "none")
            else None
        ),
        "restart": machine.restart.value,
        # A machine declared stopped is not started at boot either.
        "autostart": machine.autostart and machine.state is MachineState.RUNNING,
        "stop_timeout": _timespan(machine.stop_timeout),
        "memory_max": resources.memory,
        "memory_high": resources.memory_soft,
        # CPUQuota= expands no specifiers: an int percentage, so no filter is needed.
        "cpu_quota": max(1, round(resources.cpus * 100)) if resources.cpus is not None else None,
        # pids: max lifts the limit (unset, systemd would apply DefaultTasksMax).
        "tasks_max": resources.pids if resources.pids is not None else "infinity",
        "cpu_weight": resources.cpu_weight,
        "io_weight": resources.io_weight,
        "device_allow": [f"{d.unit_name} {d.access}" for d in DEVICE_ALLOW],
    }


def render_template(template_dir: Path, name: str, context: Mapping[str, Any]) -> str:
    """One template rendered with context."""
    return environment(template_dir).get_template(name).render(**context)


def machine_files(
    machine: Machine,
    layout: Layout,
    template_dir: Path,
    program: Sequence[str] = PROGRAM,
    uid_base: int | None = None,
) -> list[RenderedFile]:
    """Every file a machine gets on the host, rendered: its .nspawn file and unit."""
    context = nspawn_context(machine, layout, uid_base)
    nspawn = render_template(template_dir, "machine.nspawn.j2", context)
    service = render_template(
        template_dir, "machine.service.j2", service_context(machine, layout, program)
    )
    return [
        RenderedFile(layout.nspawn_file(machine.name), nspawn),
        RenderedFile(layout.unit_file(machine.name), service),
    ]


def apply_unit_context(
    spec_dir: PurePosixPath, layout: Layout, program: Sequence[str] = PROGRAM
) -> dict[str, Any]:
    """The values of pymachine-apply.service (and its .path unit): apply
    ``spec_dir`` at boot, before machines.target."""
    return {
        "marker": Escaped(MARKER),
        "spec_dir": str(spec_dir),
        "exec_start": program_argv(
            program, layout, "apply", "--yes", "--supervisor=systemd", "--", str(spec_dir)
        ),
        "unit": APPLY_UNIT,
        "lock": str(layout.run_dir / "apply.lock"),
    }


def apply_unit_files(
    spec_dir: PurePosixPath,
    layout: Layout,
    template_dir: Path,
    program: Sequence[str] = PROGRAM,
    *,
    watch: bool = False,
) -> list[RenderedFile]:
    """The boot-time apply unit, and with ``watch`` a .path unit that applies
    again when the spec directory changes."""
    context = apply_unit_context(spec_dir, layout, program)
    out = [
        RenderedFile(
            layout.unit_dir / APPLY_UNIT, render_template(template_dir, "apply.service.j2", context)
        )
    ]
    if watch:
        out.append(
            RenderedFile(
                layout.unit_dir / APPLY_PATH_UNIT,
                render_template(template_dir, "apply.path.j2", context),
            )
        )
    return out
