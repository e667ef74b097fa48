"""Parsers of host facts: text in, values out. Pure.

Each parser takes the text of a file or a command's output; reading it is the
caller's business. Tests feed them recorded text.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import PurePosixPath

# ---------------------------------------------------------------------------
# APT sources


@dataclass(frozen=True)
class AptSource:
    """One `deb` source: a mirror URI with its suites and components."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_sources_list(text: str) -> list[AptSource]:
    """`deb` lines of a one-line-style sources.list (deb-src and comments skipped)."""
    out: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        line = re.sub(r"\[[^\]]*\]", " ", line)  # options such as [arch=amd64]
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            out.append(AptSource(words[1], (words[2],), tuple(words[3:])))
    return out


def parse_deb822_sources(text: str) -> list[AptSource]:
    """`Types: deb` stanzas of a deb822 .sources file (disabled ones skipped)."""
    out: list[AptSource] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1] in (" ", "\t") and key:
                fields[key] += " " + raw.strip()
                continue
            key, sep, value = raw.partition(":")
            if sep:
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = tuple(fields.get("suites", "").split())
        components = tuple(fields.get("components", "").split())
        out.extend(AptSource(uri, suites, components) for uri in fields.get("uris", "").split())
    return out


def debian_mirror(sources: list[AptSource]) -> str | None:
    """The host's Debian archive mirror: the first source carrying a plain release
    suite (not -security, -updates or -backports) with component main."""
    for source in sources:
        plain = [s for s in source.suites if "-" not in s and "/" not in s]
        if plain and "main" in source.components and source.uri.startswith(("http", "file")):
            return source.uri.rstrip("/")
    return None


# ---------------------------------------------------------------------------
# Mounts


_SLASH = PurePosixPath("/")


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    target: PurePosixPath
    fstype: str
    source: str
    options: str
    root: PurePosixPath = _SLASH


def _unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a /proc/PID/mountinfo text, in order."""
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        left, sep, right = line.partition(" - ")
        if not sep:
            raise ValueError(f"not a mountinfo line: {line!r}")
        fields = left.split()
        fstype, source, options = [*right.split(), "", "", ""][:3]
        mounts.append(
            Mount(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                target=PurePosixPath(_unescape_mountinfo(fields[4])),
                fstype=fstype,
                source=_unescape_mountinfo(source),
                options=options,
                root=PurePosixPath(_unescape_mountinfo(fields[3])),
            )
        )
    return mounts


def _escape_mountinfo(path: str) -> str:
    return (
        path.replace("\\", "\\134")
        .replace(" ", "\\040")
        .replace("\t", "\\011")
        .replace("\n", "\\012")
    )


def mounts_at(text: str, target: PurePosixPath) -> list[Mount]:
    """The mounts of a mountinfo text exactly at target, in order (the last is
    on top): only the lines naming it are parsed, so a look at one mount
    point stays cheap however many mounts the host has."""
    needle = f" {_escape_mountinfo(str(target))} "
    lines = "\n".join(line for line in text.splitlines() if needle in line)
    return [m for m in parse_mountinfo(lines) if m.target == target]


def mounts_under(text: str, root: PurePosixPath) -> list[PurePosixPath]:
    """Mount points at or below root in a mountinfo text, deepest first (the
    order to unmount them); only the lines naming a path under root are parsed."""
    needle = f" {_escape_mountinfo(str(root))}"
    lines = "\n".join(line for line in text.splitlines() if needle in line)
    mounts = parse_mountinfo(lines)
    found = {m.target for m in mounts if m.target == root or root in m.target.parents}
    return sorted(found, key=lambda p: (len(p.parts), str(p)), reverse=True)


# ---------------------------------------------------------------------------
# Build progress


_PHASES = (
    ("Retrieving Release", "resolving"),
    ("Validating Packages", "resolving"),
    ("Resolving dependencies", "resolving"),
    ("Checking component", "resolving"),
    ("Found additional", "resolving"),
    ("Retrieving", "downloading"),
    ("Validating", "downloading"),
    ("Extracting", "unpacking"),
    ("Installing", "unpacking"),
    ("Unpacking", "unpacking"),
    ("Configuring", "configuring"),
    ("Base system installed", "configuring"),
    # mmdebstrap
    ("running apt-get update", "resolving"),
    ("downloading packages", "downloading"),
    ("extracting archives", "unpacking"),
    ("installing essential packages", "configuring"),
    ("installing remaining packages", "configuring"),
    # apt-get, in derived layers
    ("Reading package lists", "resolving"),
    ("Get:", "downloading"),
    ("Preparing to unpack", "unpacking"),
    ("Setting up", "configuring"),
)


def parse_build_phase(line: str) -> str | None:
    """The build phase a line of debootstrap output announces, if any."""
    text = line.removeprefix("I: ").strip()
    for prefix, phase in _PHASES:
        if text.startswith(prefix):
            return phase
    return None


_STAMPED = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) (.*)", re.DOTALL)


def parse_log_line(line: str) -> tuple[str | None, str]:
    """A console log line as (its UTC time stamp, the machine's text); the stamp
    is None on a line without one (a log written before stamping)."""
    match = _STAMPED.fullmatch(line)
    if match is None:
        return None, line
    return match[1], match[2]


# ---------------------------------------------------------------------------
# systemd units


def parse_systemctl_show(text: str) -> list[dict[str, str]]:
    """The KEY=VALUE blocks of ``systemctl show`` for several units, one dict
    per unit in output order (blocks are separated by blank lines)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"not a systemctl show line: {line!r}")
        current[key] = value
    if current:
        blocks.append(current)
    return blocks


def parse_unix_timestamp(value: str) -> float | None:
    """A ``--timestamp=unix`` value (``@1764380000``) in seconds; None when unset."""
    text = value.strip()
    if not text.startswith("@"):
        return None
    try:
        seconds = float(text[1:])
    except ValueError:
        return None
    return seconds if seconds > 0 else None


# ---------------------------------------------------------------------------
# Processes: what confines one (read from /proc/PID/status and /proc/PID/cgroup)


@dataclass(frozen=True)
class Confinement:
    """A process's capability sets (as bit masks), no_new_privs flag and seccomp
    mode and filter count, from its /proc/PID/status."""

    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    cap_amb: int
    no_new_privs: bool
    seccomp: int
    seccomp_filters: int


def parse_proc_status(text: str) -> Confinement:
    """The confinement of a process from the text of its /proc/PID/status."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    try:
        return Confinement(
            cap_inh=int(fields["CapInh"], 16),
            cap_prm=int(fields["CapPrm"], 16),
            cap_eff=int(fields["CapEff"], 16),
            cap_bnd=int(fields["CapBnd"], 16),
            cap_amb=int(fields.get("CapAmb", "0"), 16),
            no_new_privs=fields["NoNewPrivs"] == "1",
            seccomp=int(fields["Seccomp"]),
            # Older kernels have no count; a filter mode then means at least one.
            seccomp_filters=int(
                fields.get("Seccomp_filters", "1" if fields["Seccomp"] == "2" else "0")
            ),
        )
    except (KeyError, ValueError) as exc:
        raise ValueError(f"not a /proc/PID/status text: {exc}") from exc


@dataclass(frozen=True)
class CgroupMembership:
    """One line of /proc/PID/cgroup: a hierarchy (0 is the unified one), its
    controllers (``name=systemd`` for a named one) and the group's path."""

    hierarchy: int
    controllers: tuple[str, ...]
    path: PurePosixPath


def parse_proc_cgroup(text: str) -> list[CgroupMembership]:
    """The groups of a process, from the text of its /proc/PID/cgroup."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        hierarchy, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep and sep2) or not path.startswith("/"):
            raise ValueError(f"not a /proc/PID/cgroup line: {line!r}")
        out.append(
            CgroupMembership(
                int(hierarchy), tuple(c for c in controllers.split(",") if c), PurePosixPath(path)
            )
        )
    return out


def cgroup_directory(membership: CgroupMembership, mounts: list[Mount]) -> PurePosixPath | None:
    """Where the group of a /proc/PID/cgroup line is in the file system, from the
    mounts of the reader (its mountinfo); None if its hierarchy is not mounted
    or the group lies outside the mounted part of it."""
    for mount in mounts:
        if membership.hierarchy == 0 and not membership.controllers:
            if mount.fstype != "cgroup2":
                continue
        elif mount.fstype != "cgroup" or not set(membership.controllers) <= set(
            mount.options.split(",")
        ):
            continue
        if membership.path != mount.root and mount.root not in membership.path.parents:
            continue
        return mount.target / membership.path.relative_to(mount.root)
    return None


# ---------------------------------------------------------------------------
# Users: /etc/passwd and /etc/group of a machine (hostile text: never trusted)


@dataclass(frozen=True)
class Credentials:
    """Who a process runs as: ids, supplementary groups, home and shell."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str


def _id(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and int(text) < 2**32 - 1 else None


def resolve_user(user: str, passwd: str, group: str) -> Credentials:
    """The credentials of ``user`` (a name or number, optionally ``:group``) as
    the texts of a machine's /etc/passwd and /etc/group define them, with the
    supplementary groups that list it as a member (what nspawn gives a
    machine's ``user``: the primary group is not repeated there). A number
    not in the files is taken as it is, with home /."""
    name, _, group_name = user.partition(":")
    entry: tuple[str, int, int, str, str] | None = None
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) < 7:
            continue
        uid, gid = _id(fields[2]), _id(fields[3])
        if uid is None or gid is None:
            continue
        if fields[0] == name or (_id(name) is not None and uid == _id(name)):
            entry = (fields[0], uid, gid, fields[5] or "/", fields[6] or "/bin/sh")
            break
    if entry is None:
        number = _id(name)
        if number is None:
            raise ValueError(f"no user {name!r} in the machine's /etc/passwd")
        entry = (name, number, number, "/", "/bin/sh")
    login, uid, gid, home, shell = entry
    groups: list[int] = []
    for line in group.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or _id(fields[2]) is None:
            continue
        number = _id(fields[2])
        assert number is not None
        if group_name and (fields[0] == group_name or _id(group_name) == number):
            gid = number
            group_name = ""
        if login in fields[3].split(",") and number not in groups:
            groups.append(number)
    if group_name:
        number = _id(group_name)
        if number is None:
            raise ValueError(f"no group {group_name!r} in the machine's /etc/group")
        gid = number
    return Credentials(login, uid, gid, tuple(sorted(groups)), home, shell)


STARTING_MARK = "-- pymachined: starting "
"""What pymachined writes into a machine's log before each start."""

_KILLED = re.compile(r"Container \S+ terminated by signal (?:SIG)?([A-Z0-9+]+)\.")


def parse_payload_signal(tail: str) -> int | None:
    """The signal that killed a machine's payload, from the last lines nspawn
    wrote ("Container NAME terminated by signal KILL."), or None. nspawn itself
    then exits 1, which would hide the signal (Docker says 137 for a KILL)."""
    found = _KILLED.findall(tail.rpartition(STARTING_MARK)[2])
    if not found:
        return None
    name = found[-1]
    try:
        return int(signal.Signals[f"SIG{name}"])
    except KeyError:
        return None


TCP_LISTEN = "0A"
UDP_UNCONNECTED = "07"  # TCP_CLOSE: a bound UDP socket that is not connected


@dataclass(frozen=True)
class Socket:
    """A socket bound on the host that holds a port for everyone who calls it:
    a listening TCP socket, or an unconnected UDP one."""

    protocol: str  # tcp or udp
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    inode: int


def _proc_net_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # The kernel prints each 32-bit word of the address as an integer in the
    # host's byte order.
    words = [text[i : i + 8] for i in range(0, len(text), 8)]
    raw = b"".join(int(word, 16).to_bytes(4, sys.byteorder) for word in words)
    return ipaddress.ip_address(raw)


def parse_proc_net(text: str, protocol: str) -> list[Socket]:
    """The sockets that hold ports in /proc/net/tcp, tcp6, udp or udp6 (one
    file's text; ``protocol`` is tcp or udp). Lines that cannot be read are
    left out."""
    wanted = TCP_LISTEN if protocol == "tcp" else UDP_UNCONNECTED
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != wanted:
            continue
        address, _, port = fields[1].partition(":")
        try:
            found.append(
                Socket(protocol, _proc_net_address(address), int(port, 16), int(fields[9]))
            )
        except ValueError:
            continue
    return found
