"""Command lines pymachine runs, built as argv lists. Pure.

Every function returns a list for run.py; none runs anything. User-supplied
operands come after ``--`` wherever the tool accepts it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

from pymachined.core.spec import Bootstrap

DEBOOTSTRAP = "debootstrap"
MMDEBSTRAP = "mmdebstrap"
NSPAWN = "systemd-nspawn"


def isolated_argv(argv: Sequence[str]) -> list[str]:
    """argv in private mount and PID namespaces that die with pymachine.

    setpriv makes unshare get SIGKILL when its parent (pymachine) dies; unshare
    then kills its child, which is PID 1 of the new PID namespace, so the kernel
    kills every process in it; the mount namespace, and every mount made in it
    (debootstrap's /proc and /sys in the target), goes with its last process.
    The namespace gets its own /proc: systemd-nspawn looks itself up there by
    the pid it has in it (its cgroup, under systemd), which the host's /proc
    does not know."""
    return [
        "setpriv",
        "--pdeathsig",
        "KILL",
        "--",
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
        "--",
        *argv,
    ]


def debootstrap_argv(bootstrap: Bootstrap, target: PurePosixPath, mirror: str) -> list[str]:
    """debootstrap of a recipe into target. debootstrap takes no ``--``; the suite
    and mirror are validated in the spec and cannot start with '-'."""
    argv = [DEBOOTSTRAP, f"--variant={bootstrap.variant}"]
    if bootstrap.components != ["main"]:
        argv.append(f"--components={','.join(bootstrap.components)}")
    if bootstrap.include:
        argv.append(f"--include={','.join(bootstrap.include)}")
    if bootstrap.exclude:
        argv.append(f"--exclude={','.join(bootstrap.exclude)}")
    return [*argv, bootstrap.suite, str(target), mirror]


def mmdebstrap_argv(bootstrap: Bootstrap, target: PurePosixPath, mirror: str) -> list[str]:
    """mmdebstrap of a recipe into target (as root); excluded packages are
    removed with apt's ``pkg-`` syntax."""
    argv = [
        MMDEBSTRAP,
        "--mode=root",
        f"--variant={bootstrap.variant}",
        f"--components={','.join(bootstrap.components)}",
    ]
    packages = [*bootstrap.include, *(f"{p}-" for p in bootstrap.exclude)]
    if packages:
        argv.append(f"--include={','.join(packages)}")
    return [*argv, bootstrap.suite, str(target), mirror]


def bootstrap_argv(
    tool: str, bootstrap: Bootstrap, target: PurePosixPath, mirror: str
) -> list[str]:
    """The command line of the chosen bootstrap tool."""
    if tool == MMDEBSTRAP:
        return mmdebstrap_argv(bootstrap, target, mirror)
    return debootstrap_argv(bootstrap, target, mirror)


# The proxy settings a build step gets from pymachine's environment, as Docker
# passes its predefined proxy build arguments: apt in a derived layer fetches
# through the proxy a host must use. They are no part of a layer's key.
PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
)


def nspawn_run_argv(
    root: PurePosixPath,
    command: Sequence[str],
    *,
    binds_ro: Sequence[tuple[PurePosixPath, PurePosixPath]] = (),
    network: bool = True,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Run command in root with systemd-nspawn for a build step: not registered
    with machined, in the caller's unit, the host's DNS copied in; env's
    variables set (nspawn gives a machine none of its caller's)."""
    argv = [
        NSPAWN,
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--as-pid2",
        "--resolv-conf=copy-host",
        "--timezone=off",
        f"--directory={root}",
        "--setenv=DEBIAN_FRONTEND=noninteractive",
        "--setenv=LC_ALL=C",
        *(f"--setenv={key}={value}" for key, value in sorted((env or {}).items())),
    ]
    if not network:
        argv.append("--private-network")
    argv += [f"--bind-ro={source}:{target}" for source, target in binds_ro]
    return [*argv, "--", *command]


def overlay_mount_argv(
    lowers: Sequence[PurePosixPath],
    target: PurePosixPath,
    upper: PurePosixPath | None = None,
    work: PurePosixPath | None = None,
    *,
    metacopy: bool = False,
) -> list[str]:
    """Mount an overlay of lowers (topmost first) at target; read-only without upper.
    With metacopy, a change of owner or mode copies up only the inode, not the
    data: shifting a root to a user namespace's ids then costs metadata alone.
    Always nodev: a device node an image holds opens nothing (setuid binaries
    must still work in a machine, so not nosuid)."""
    options = overlay_options(lowers, upper, work, metacopy=metacopy)
    return ["mount", "-t", "overlay", "-o", f"nodev,{options}", "--", "pymachine", str(target)]


def overlay_options(
    lowers: Sequence[PurePosixPath],
    upper: PurePosixPath | None = None,
    work: PurePosixPath | None = None,
    *,
    metacopy: bool = False,
) -> str:
    """The overlayfs options of an overlay of lowers (topmost first), over
    upper and work if given (read-only without)."""
    options = [f"lowerdir={':'.join(str(p) for p in lowers)}"]
    if upper is not None and work is not None:
        options += [f"upperdir={upper}", f"workdir={work}"]
        if metacopy:
            options += ["redirect_dir=on", "metacopy=on"]
    else:
        options.append("ro")
    return ",".join(options)


def tmpfs_mount_argv(target: PurePosixPath, mode: str = "0700") -> list[str]:
    """Mount a tmpfs at target, nodev (it holds an ephemeral root's upper layer)."""
    return ["mount", "-t", "tmpfs", "-o", f"mode={mode},nodev", "--", "pymachine", str(target)]


def nodev_bind_argv(target: PurePosixPath) -> list[str]:
    """Bind-mount target onto itself without devices: a copied root lives on
    the host's own file system, whose device nodes would otherwise open."""
    return ["mount", "--bind", "-o", "nodev", "--", str(target), str(target)]


def umount_argv(target: PurePosixPath) -> list[str]:
    """Unmount target."""
    return ["umount", "--", str(target)]


def copy_tree_argv(source: PurePosixPath, target: PurePosixPath) -> list[str]:
    """Copy a tree with owners, modes, links, xattrs; reflinks where the filesystem can."""
    return ["cp", "-a", "--reflink=auto", "--", f"{source}/.", str(target)]


# A volume's archive: numeric owners (a volume holds the IDs its machines see,
# so they are relative to the volume, never the host's names), every xattr
# (POSIX ACLs are xattrs too), hard links within it, holes kept.
_ARCHIVE = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]


def archive_create_argv(directory: PurePosixPath, file: str) -> list[str]:
    """A POSIX tar of directory's content into file ("-": stdout)."""
    return [
        "tar",
        "--create",
        f"--file={file}",
        f"--directory={directory}",
        *_ARCHIVE,
        "--sparse",
        "--format=posix",
        "--one-file-system",
        ".",
    ]


def archive_extract_argv(file: str, directory: PurePosixPath) -> list[str]:
    """Extract the tar file ("-": stdin) into directory with its owners and
    modes. GNU tar refuses members that climb out with ``..``, strips leading
    slashes and never writes through a symlink the archive made."""
    return [
        "tar",
        "--extract",
        f"--file={file}",
        f"--directory={directory}",
        *_ARCHIVE,
        "--same-owner",
        "--same-permissions",
        "--warning=no-timestamp",
    ]


def enter_argv(
    python: str,
    pid: int,
    command: Sequence[str],
    env: Sequence[str] = (),
    user: str | None = None,
    workdir: str | None = None,
) -> list[str]:
    """Run command inside the machine whose PID 1 is pid (its host pid), confined
    as that process is (``pymachined.enter``), as user in workdir, with the
    KEY=VALUE pairs of env over nspawn's standard environment."""
    argv = [python, "-m", "pymachined.enter", f"--pid={pid}"]
    if user is not None:
        argv.append(f"--user={user}")
    if workdir is not None:
        argv.append(f"--workdir={workdir}")
    argv += [f"--env={pair}" for pair in env]
    return [*argv, "--", *command]


def journal_argv(follow: bool, lines: int | None, since: str | None, timestamps: bool) -> list[str]:
    """journalctl of a booted machine's own journal, run inside it: its messages
    as journalctl prints them, their times in UTC as ISO 8601 with timestamps;
    since is a UTC time as ``YYYY-MM-DD HH:MM:SS``."""
    argv = ["journalctl", "--no-pager", "--utc", "-o", "short-iso" if timestamps else "short"]
    if follow:
        argv.append("--follow")
    if lines is not None:
        argv.append(f"--lines={lines}")
    if since is not None:
        argv.append(f"--since={since} UTC")
    return argv


# A fixed script: each argument up to "--" is a cgroup.procs file the shell
# writes its own pid into; then it becomes the command after "--".
LOG_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# The log is opened by name, its bytes counted, and past the cap it is closed
# and renamed to LOG.1 (by a shell that reads both paths from the environment,
# so no path is ever parsed as a command), then opened afresh.
_STAMP = (
    'BEGIN { f = ENVIRON["PYMACHINE_LOG"]; max = ENVIRON["PYMACHINE_LOG_MAX"] + 0;'
    ' size = ENVIRON["PYMACHINE_LOG_SIZE"] + 0 }'
    ' { line = strftime("' + LOG_TIME_FORMAT + '") " " $0; print line >> f; fflush(f);'
    " size += length(line) + 1;"
    ' if (size >= max) { close(f); system("exec mv -f -- \\"$PYMACHINE_LOG\\"'
    ' \\"$PYMACHINE_LOG_OLD\\""); size = 0 } }'
)


def rotated_log(log: PurePosixPath) -> PurePosixPath:
    """Where a console log goes when it is rotated: LOG.1."""
    return log.with_name(log.name + ".1")


def log_stamp_argv() -> list[str]:
    """A filter that starts each line of a machine's output with the UTC time it
    was read, appended to the log ``log_stamp_environment`` names: what ``logs
    --since`` and ``logs --timestamps`` read back. Past the size cap it renames
    the log to LOG.1 (replacing the one before) and starts a new one. mawk, as
    every Debian system has it (it is Essential; its length() counts bytes);
    ``-W interactive`` makes it read line by line rather than wait for a full
    buffer."""
    return ["mawk", "-W", "interactive", _STAMP]


def log_stamp_environment(log: PurePosixPath, max_size: int, size: int) -> dict[str, str]:
    """What the log filter's environment adds for a log that is ``size`` bytes
    long now and capped at ``max_size``: its paths, never part of the program
    or of a shell line, and UTC for its clock."""
    return {
        "TZ": "UTC",
        "PYMACHINE_LOG": str(log),
        "PYMACHINE_LOG_OLD": str(rotated_log(log)),
        "PYMACHINE_LOG_MAX": str(max_size),
        "PYMACHINE_LOG_SIZE": str(size),
    }


_ENTER = 'for f; do shift; [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; done; exec "$@"'


def cgroup_enter_argv(procs: Sequence[PurePosixPath], argv: Sequence[str]) -> list[str]:
    """argv started inside the cgroups whose cgroup.procs files are procs, so that
    everything it forks is in them from the first instant; if it cannot enter
    one, it does not start (exit 125), rather than run unlimited."""
    return ["/bin/sh", "-c", _ENTER, "sh", *map(str, procs), "--", *argv]


SYSTEMCTL = "systemctl"


def systemctl_argv(verb: str, units: Sequence[str], *flags: str) -> list[str]:
    """systemctl VERB [FLAGS] -- UNITS (start, stop, restart, enable, disable…)."""
    return [SYSTEMCTL, verb, *flags, "--", *units]


def unregister_machine_argv(name: str) -> list[str]:
    """Drop a machine's registration with systemd-machined without touching its
    processes (TerminateMachine would stop the unit asking)."""
    return [
        "busctl",
        "call",
        "--quiet",
        "--",
        "org.freedesktop.machine1",
        "/org/freedesktop/machine1",
        "org.freedesktop.machine1.Manager",
        "UnregisterMachine",
        "s",
        name,
    ]


def daemon_reload_argv() -> list[str]:
    """systemctl daemon-reload: systemd reads changed unit files again."""
    return [SYSTEMCTL, "daemon-reload"]


def systemctl_show_argv(units: Sequence[str], properties: Sequence[str]) -> list[str]:
    """One systemctl show for many units: a KEY=VALUE block per unit, blank
    lines between, timestamps as @SECONDS."""
    return [
        SYSTEMCTL,
        "show",
        "--timestamp=unix",
        f"--property={','.join(properties)}",
        "--",
        *units,
    ]


def set_property_argv(unit: str, properties: Sequence[tuple[str, str]]) -> list[str]:
    """systemctl set-property --runtime: resource limits changed on a running unit
    without a restart (until the next boot, when the unit file, rewritten with
    the same values, takes over)."""
    return [
        SYSTEMCTL,
        "set-property",
        "--runtime",
        "--",
        unit,
        *(f"{key}={value}" for key, value in properties),
    ]


DNSMASQ = "dnsmasq"


def resolver_argv(
    directory: PurePosixPath, listen: Sequence[str], upstream: PurePosixPath | None
) -> list[str]:
    """dnsmasq as a network's resolver, in the foreground: it answers on the
    gateway addresses only (never loopback or another bridge, and it binds
    them again when the bridge is made again), from the hosts files in
    ``directory/hosts.d`` (read again by inotify when one is renamed there, so
    names change with no signal; dotted temporary names are skipped), and
    forwards what they lack, unless it has no dot, to the servers in
    ``upstream`` (None: to nobody, for a network without NAT, whose machines
    would otherwise reach outside through names); no DHCP, no config file,
    not the host's /etc/hosts. It drops root for ``nobody`` once bound."""
    return [
        DNSMASQ,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--bind-dynamic",
        *(f"--listen-address={address}" for address in listen),
        "--no-hosts",
        f"--hostsdir={directory / 'hosts.d'}",
        f"--resolv-file={upstream}" if upstream is not None else "--no-resolv",
        "--domain-needed",
        "--bogus-priv",
        f"--pid-file={directory / 'pid'}",
        "--log-facility=-",
    ]


def transient_service_argv(unit: str, argv: Sequence[str]) -> list[str]:
    """systemd-run: argv as a transient service that systemd restarts whenever
    it ends, unloaded once stopped."""
    return [
        "systemd-run",
        "--quiet",
        "--collect",
        f"--unit={unit}",
        "--property=Restart=always",
        "--property=RestartSec=200ms",
        "--",
        *argv,
    ]
