"""The spec models: what a user declares, as frozen, strict pydantic models. Pure.

Four kinds: ``machine`` (the default), ``network``, ``image`` and ``volume``. Field names are
a contract with users and tests. Every string that can reach a unit file or an
``.nspawn`` file is checked here, so templates never see an unsafe value.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyAddress,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)

from pymachined.core.limits import DEFAULT_LOG_MAX
from pymachined.core.sizes import format_size, parse_duration, parse_size

# ---------------------------------------------------------------------------
# Scalar types


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

MAX_TEXT_BYTES = 64 * 1024
"""The longest single string of a spec (a command argument, an environment
value, a label): half of the kernel's limit on one argument (MAX_ARG_STRLEN,
128 KiB), so that it also fits as ``--setenv=NAME=VALUE``."""
MAX_EXEC_BYTES = 128 * 1024
"""The most a machine's ``command`` and ``environment`` may hold together, each
string counted as execve(2) counts it (with its NUL, ``NAME=VALUE``): well
within ARG_MAX, with room for what nspawn and the supervisor add, so that a
start never fails with E2BIG."""


def _utf8_size(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass"))


def check_safe_text(value: str) -> str:
    """A string that may enter a unit or .nspawn file: one line, no control
    characters, at most MAX_TEXT_BYTES."""
    if _utf8_size(value) > MAX_TEXT_BYTES:
        raise ValueError(
            f"is {_utf8_size(value)} bytes long; a single string is at most {MAX_TEXT_BYTES}"
        )
    bad = _CONTROL.search(value)
    if bad is not None:
        what = {"\n": "a newline", "\r": "a carriage return", "\x00": "a NUL byte"}.get(
            bad.group(), f"the control character {bad.group()!r}"
        )
        raise ValueError(f"must not contain {what}")
    if value.endswith("\\"):
        raise ValueError("must not end with a backslash (it would continue the line)")
    return value


SafeText = Annotated[StrictStr, AfterValidator(check_safe_text)]

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def check_name(value: str) -> str:
    """An RFC 1123 label: lowercase letters, digits and '-', at most 63, no leading '-'."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > 63:
        raise ValueError(f"is {len(value)} characters long; at most 63 are allowed")
    if _LABEL.fullmatch(value) is None:
        hint = value.lower().replace("_", "-").replace(".", "-")
        suggestion = f" (such as {hint!r})" if _LABEL.fullmatch(hint) else ""
        raise ValueError(
            f"{value!r} is not a valid name: use lowercase letters, digits and '-', "
            f"starting and ending with a letter or digit{suggestion}"
        )
    return value


Name = Annotated[StrictStr, AfterValidator(check_name)]


def matching(pattern: str, what: str) -> Callable[[str], str]:
    """A validator accepting strings that match pattern entirely, else '... is not {what}'."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if compiled.fullmatch(value) is None:
            raise ValueError(f"{value!r} is not {what}")
        return value

    return check


_DNS_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
Hostname = Annotated[
    StrictStr,
    AfterValidator(matching(rf"(?=.{{1,253}}$){_DNS_LABEL}(\.{_DNS_LABEL})*", "a valid host name")),
]

FORBIDDEN_PATHS = ("/", "/proc", "/sys", "/dev")
FORBIDDEN_TREES = ("/proc", "/sys")


def check_abs_path(value: str) -> str:
    """An absolute, normalised path without control characters."""
    check_safe_text(value)
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path")
    normal = posixpath.normpath(value)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if normal != value:
        raise ValueError(f"{value!r} is not a normalised path (did you mean {normal!r}?)")
    if ":" in value:
        raise ValueError(f"{value!r} must not contain ':'")
    return value


AbsPath = Annotated[StrictStr, AfterValidator(check_abs_path)]


def check_mount_path(value: str) -> str:
    """A path that may be bound or mounted: not /, /proc, /sys or /dev, nor under /proc or /sys."""
    check_abs_path(value)
    if value in FORBIDDEN_PATHS:
        raise ValueError(f"{value!r} cannot be bound or mounted over")
    for tree in FORBIDDEN_TREES:
        if value.startswith(tree + "/"):
            raise ValueError(f"{value!r} is under {tree}, which cannot be bound")
    return value


MountPath = Annotated[StrictStr, AfterValidator(check_mount_path)]

EnvName = Annotated[
    StrictStr,
    AfterValidator(matching(r"[A-Za-z_][A-Za-z0-9_]*", "a valid environment variable name")),
]
# A label key as Kubernetes spells them: an optional ``prefix/`` and a name.
LabelKey = Annotated[
    StrictStr,
    AfterValidator(
        matching(
            r"([a-z0-9]([a-z0-9.-]*[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?",
            "a valid label key",
        )
    ),
]
# A Debian package name, with an optional ``:arch`` and ``=version``.
PackageName = Annotated[
    StrictStr,
    AfterValidator(
        matching(
            r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?",
            "a valid Debian package name",
        )
    ),
]
Mode = Annotated[
    StrictStr, AfterValidator(matching(r"0?[0-7]{3}", "an octal file mode such as '0644'"))
]

Size = Annotated[int, BeforeValidator(parse_size, json_schema_input_type=int | str)]
PositiveSize = Annotated[Size, Field(gt=0)]
Duration = Annotated[float, BeforeValidator(parse_duration, json_schema_input_type=float | str)]

# The signals a machine may be stopped with: what payloads handle for a clean
# shutdown. SIGKILL is left out: it follows stop_timeout anyway.
_STOP_SIGNALS = ("TERM", "INT", "QUIT", "HUP", "USR1", "USR2", "WINCH", "PWR")


def parse_stop_signal(value: object) -> object:
    """A stop signal as ``SIGTERM``, from ``SIGTERM``, ``TERM`` or
    ``SIGRTMIN+N`` (N from 0 to 30)."""
    if not isinstance(value, str):
        return value
    name = value.upper().removeprefix("SIG")
    if name in _STOP_SIGNALS:
        return f"SIG{name}"
    if name.startswith("RTMIN+") and name[6:].isdigit() and int(name[6:]) <= 30:
        return f"SIGRTMIN+{int(name[6:])}"
    raise ValueError(
        f"{value!r} is not a signal to stop a machine with: use one of "
        + ", ".join(f"SIG{n}" for n in _STOP_SIGNALS)
        + " or SIGRTMIN+N"
    )


StopSignal = Annotated[StrictStr, BeforeValidator(parse_stop_signal, json_schema_input_type=str)]

# The capabilities systemd-nspawn knows (capability(7)), without the CAP_ prefix.
CAPABILITIES = frozenset(
    (
        "AUDIT_CONTROL",
        "AUDIT_READ",
        "AUDIT_WRITE",
        "BLOCK_SUSPEND",
        "BPF",
        "CHECKPOINT_RESTORE",
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "IPC_LOCK",
        "IPC_OWNER",
        "KILL",
        "LEASE",
        "LINUX_IMMUTABLE",
        "MAC_ADMIN",
        "MAC_OVERRIDE",
        "MKNOD",
        "NET_ADMIN",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_RAW",
        "PERFMON",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYSLOG",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_CHROOT",
        "SYS_MODULE",
        "SYS_NICE",
        "SYS_PACCT",
        "SYS_PTRACE",
        "SYS_RAWIO",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "WAKE_ALARM",
    )
)


def check_capability(value: str) -> str:
    """A capability name, normalised to ``CAP_NAME``; ``all`` stands for every one."""
    if value.lower() == "all":
        return "all"
    bare = value.upper().removeprefix("CAP_")
    if bare not in CAPABILITIES:
        import difflib

        close = difflib.get_close_matches(bare, sorted(CAPABILITIES), n=1)
        suggestion = f" (did you mean 'CAP_{close[0]}'?)" if close else ""
        raise ValueError(f"{value!r} is not a Linux capability{suggestion}")
    return "CAP_" + bare


Capability = Annotated[StrictStr, AfterValidator(check_capability)]

# A system call name or a systemd syscall group such as ``@mount``.
Syscall = Annotated[
    StrictStr, AfterValidator(matching(r"@?[a-z0-9_-]+", "a system call or @group name"))
]


class RootfsMode(StrEnum):
    """How a machine's root is made from its image."""

    OVERLAY = "overlay"
    COPY = "copy"
    EPHEMERAL = "ephemeral"


class RestartPolicy(StrEnum):
    """When a stopped machine is started again by its supervisor."""

    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


class MachineState(StrEnum):
    """The state a machine should be in."""

    RUNNING = "running"
    STOPPED = "stopped"


class Protocol(StrEnum):
    """A transport protocol for port forwards."""

    TCP = "tcp"
    UDP = "udp"


# ---------------------------------------------------------------------------
# Parts


class Model(BaseModel):
    """Base for every spec model: strict about unknown keys, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _parse_pair(value: Any, first: str, what: str, usage: str) -> Any:
    """``"A:B[:ro|rw]"`` -> ``{first: A, "target": B, "read_only": ...}``;
    mappings pass through."""
    if not isinstance(value, str):
        return value
    parts = value.split(":")
    if len(parts) == 2:
        return {first: parts[0], "target": parts[1]}
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        return {first: parts[0], "target": parts[1], "read_only": parts[2] == "ro"}
    raise ValueError(f"{value!r} is not {what}: use {usage}")


def _parse_bind(value: Any) -> Any:
    """``"src:dst[:ro|rw]"`` -> the mapping form."""
    return _parse_pair(value, "source", "a bind", "'SOURCE:TARGET' or 'SOURCE:TARGET:ro'")


class Bind(Model):
    """A host directory or file bound into the machine."""

    source: MountPath
    target: MountPath
    read_only: StrictBool = False
    # Mapped into the machine's user namespace (an ID-mapped mount): a file
    # the host's UID N owns is N's inside, and what the machine writes is
    # stored with its own IDs, whatever its range. No effect without one.
    idmap: StrictBool = False


BindItem = Annotated[Bind, BeforeValidator(_parse_bind, json_schema_input_type=str | Bind)]


def _parse_volume_mount(value: Any) -> Any:
    """``"NAME:/path[:ro|rw]"`` -> the mapping form."""
    return _parse_pair(value, "name", "a volume", "'NAME:/PATH' or 'NAME:/PATH:ro'")


class VolumeMount(Model):
    """A declared volume mounted in the machine."""

    name: Name
    target: MountPath
    read_only: StrictBool = False


VolumeItem = Annotated[
    VolumeMount, BeforeValidator(_parse_volume_mount, json_schema_input_type=str | VolumeMount)
]


def _parse_tmpfs(value: Any) -> Any:
    """``"/path[:size]"`` -> the mapping form."""
    if not isinstance(value, str):
        return value
    path, sep, size = value.partition(":")
    return {"path": path, "size": size} if sep else {"path": path}


class Tmpfs(Model):
    """A tmpfs mounted in the machine, such as /tmp on a read-only root."""

    path: MountPath
    size: PositiveSize | None = None


TmpfsItem = Annotated[Tmpfs, BeforeValidator(_parse_tmpfs, json_schema_input_type=str | Tmpfs)]


class File(Model):
    """A file written into a root: its absolute path, content and mode."""

    path: AbsPath
    content: StrictStr = Field(max_length=1024 * 1024)
    mode: Mode = "0644"


def _refuse_repeats(values: list[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what} {value} is listed twice")
        seen.add(value)


def _distinct_file_paths(value: list[File]) -> list[File]:
    _refuse_repeats([f.path for f in value], "file path")
    return value


Files = Annotated[list[File], AfterValidator(_distinct_file_paths)]


_PORT = re.compile(
    r"(?:(?P<ip>\[[0-9A-Fa-f:.]+\]|[0-9.]+):)?(?P<host>\d+):(?P<machine>\d+)(?:/(?P<proto>[a-z]+))?"
)


def _parse_port(value: Any) -> Any:
    """``"[ip:]host:machine[/tcp|udp]"`` -> the mapping form."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            f"{value} is not a port forward: write it as 'HOST:MACHINE', such as '8080:80'"
        )
    if not isinstance(value, str):
        return value
    match = _PORT.fullmatch(value)
    if match is None:
        raise ValueError(
            f"{value!r} is not a port forward: use '[IP:]HOST:MACHINE[/tcp|udp]', "
            "such as '8080:80' or '127.0.0.1:5353:53/udp'"
        )
    out: dict[str, Any] = {"host": int(match["host"]), "machine": int(match["machine"])}
    if match["ip"]:
        out["host_ip"] = match["ip"].strip("[]")
    if match["proto"]:
        out["protocol"] = match["proto"]
    return out


def check_port(value: int) -> int:
    """A TCP or UDP port number."""
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is out of range 1-65535")
    return value


PortNumber = Annotated[StrictInt, AfterValidator(check_port)]


class Port(Model):
    """A port on the host forwarded to a port in the machine."""

    host: PortNumber
    machine: PortNumber
    protocol: Protocol = Protocol.TCP
    host_ip: IPvAnyAddress | None = None


PortItem = Annotated[Port, BeforeValidator(_parse_port, json_schema_input_type=str | Port)]


DEFAULT_PIDS = 2048
"""Podman's default: a fork bomb stops at 2048 tasks, far below the smallest
default kernel.pid_max (32768), so one machine cannot take every PID of the
host; a booted systemd with its services uses a few hundred at most."""


def _parse_pids(value: Any) -> Any:
    if value == "max":
        return None  # no limit, as cgroups spell it
    if isinstance(value, str):
        raise ValueError(f"{value!r} is not a number of tasks: use a number, or max for no limit")
    return value


class Resources(Model):
    """Resource limits of a machine's cgroup."""

    memory: PositiveSize | None = None
    memory_soft: PositiveSize | None = None
    cpus: Annotated[float, Field(gt=0, le=1024, strict=True, allow_inf_nan=False)] | None = None
    pids: Annotated[
        Annotated[StrictInt, Field(ge=1, le=4194304)] | None,
        BeforeValidator(_parse_pids, json_schema_input_type=int | Literal["max"]),
    ] = DEFAULT_PIDS
    cpu_weight: Annotated[StrictInt, Field(ge=1, le=10000)] | None = None
    io_weight: Annotated[StrictInt, Field(ge=1, le=10000)] | None = None

    @field_validator("memory_soft")
    @classmethod
    def _soft_below_hard(cls, value: int | None, info: ValidationInfo) -> int | None:
        hard = info.data.get("memory")
        if value is not None and hard is not None and value > hard:
            raise ValueError(f"memory_soft ({value} bytes) is larger than memory ({hard} bytes)")
        return value


class Log(Model):
    """How much of a machine's console output pymachined keeps."""

    # The log is rotated to console.log.1 past max_size: at most about twice
    # max_size on disk.
    max_size: Annotated[Size, Field(ge=64 * 1024)] = DEFAULT_LOG_MAX


class Capabilities(Model):
    """Capabilities added to or dropped from nspawn's default bounding set."""

    add: list[Capability] = Field(default_factory=list)
    drop: list[Capability] = Field(default_factory=list)

    @field_validator("drop")
    @classmethod
    def _disjoint(cls, value: list[str], info: ValidationInfo) -> list[str]:
        both = sorted(set(info.data.get("add", ())) & set(value))
        if both:
            raise ValueError(f"{', '.join(both)} is both added and dropped")
        return value


def _parse_seccomp(value: Any) -> Any:
    """``"default"`` -> the default filter."""
    if value == "default":
        return {}
    if isinstance(value, str):
        raise ValueError(
            f"{value!r} is not a seccomp setting: use 'default' or {{allow: [...], deny: [...]}}"
        )
    return value


class Seccomp(Model):
    """The system call filter: nspawn's default, plus allowed and denied calls or @groups."""

    allow: list[Syscall] = Field(default_factory=list)
    deny: list[Syscall] = Field(default_factory=list)


class Security(Model):
    """How a machine is confined."""

    # On by default: systemd-nspawn picks a UID range from the machine's name and
    # shifts the root's ownership to it once (an ID-mapped mount where the kernel
    # can, else a chown of the overlay's inodes); the range is kept in the root.
    private_users: StrictBool = True
    capabilities: Capabilities = Field(default_factory=Capabilities)
    no_new_privileges: StrictBool = False
    seccomp: Annotated[
        Seccomp,
        BeforeValidator(_parse_seccomp, json_schema_input_type=Literal["default"] | Seccomp),
    ] = Field(default_factory=Seccomp)


def _reject_string_command(value: Any) -> Any:
    if isinstance(value, str):
        raise ValueError(
            "command must be a list of arguments, such as [sh, -c, 'echo hi'], not a string"
        )
    return value


Command = Annotated[
    list[SafeText],
    Field(min_length=1),
    BeforeValidator(_reject_string_command, json_schema_input_type=list[str]),
]


def _check_exec_size(command: list[str], environment: dict[str, str]) -> None:
    total = sum(_utf8_size(a) + 1 for a in command)
    total += sum(_utf8_size(k) + _utf8_size(v) + 2 for k, v in environment.items())
    if total > MAX_EXEC_BYTES:
        raise ValueError(
            f"command and environment are {total} bytes together; the limit is "
            f"{MAX_EXEC_BYTES} (pass large data in a file or a bind instead)"
        )


def _check_network_ref(value: str) -> str:
    if value in ("host", "none"):
        return value
    return check_name(value)


NetworkRef = Annotated[StrictStr, AfterValidator(_check_network_ref)]

# ---------------------------------------------------------------------------
# The three kinds


class Machine(Model):
    """``kind: machine``: a systemd-nspawn machine."""

    kind: Literal["machine"] = "machine"
    name: Name
    labels: dict[LabelKey, SafeText] = Field(default_factory=dict)
    image: Name = "debian-bookworm"
    packages: list[PackageName] = Field(default_factory=list)
    boot: StrictBool = False
    command: Command | None = Field(default=None, validate_default=True)
    user: SafeText | None = None
    workdir: AbsPath | None = None
    environment: dict[EnvName, SafeText] = Field(default_factory=dict)
    hostname: Hostname | None = None
    rootfs: RootfsMode = RootfsMode.OVERLAY
    read_only: StrictBool = False
    tmpfs: list[TmpfsItem] = Field(default_factory=list)
    binds: list[BindItem] = Field(default_factory=list)
    volumes: list[VolumeItem] = Field(default_factory=list)
    files: Files = Field(default_factory=list)
    network: NetworkRef = "host"
    address: ipaddress.IPv4Address | None = None
    ports: list[PortItem] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    log: Log = Field(default_factory=Log)
    security: Security = Field(default_factory=Security)
    restart: RestartPolicy = RestartPolicy.ON_FAILURE
    stop_timeout: Annotated[Duration, Field(gt=0)] = 10.0
    stop_signal: StopSignal | None = None
    autostart: StrictBool = True
    state: MachineState = MachineState.RUNNING
    depends_on: list[Name] = Field(default_factory=list)

    @property
    def kill_signal(self) -> str:
        """The signal a stop sends the payload: the declared one, else SIGTERM
        for a command and SIGRTMIN+3 (systemd's orderly shutdown) for a boot."""
        return self.stop_signal or ("SIGRTMIN+3" if self.boot else "SIGTERM")

    @field_validator("name")
    @classmethod
    def _not_apply(cls, value: str) -> str:
        if value == "apply":
            raise ValueError(
                "'apply' is reserved: pymachine-apply.service is pymachine's boot-time unit"
            )
        return value

    @field_validator("command")
    @classmethod
    def _boot_or_command(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        boot = info.data.get("boot", False)
        if boot and value is not None:
            raise ValueError("set either boot: true or a command, not both")
        if not boot and value is None and "boot" in info.data:
            raise ValueError("missing: set a command to run, or boot: true to run systemd as init")
        _check_exec_size(value or [], {})
        return value

    @field_validator("environment")
    @classmethod
    def _exec_size(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        _check_exec_size(info.data.get("command") or [], value)
        return value

    @field_validator("user")
    @classmethod
    def _user_needs_command(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("boot"):
            raise ValueError("user applies to a command; a booted machine runs systemd as root")
        return value

    @field_validator("tmpfs")
    @classmethod
    def _tmpfs_paths_differ(cls, value: list[Tmpfs]) -> list[Tmpfs]:
        _refuse_repeats([t.path for t in value], "tmpfs path")
        return value

    @field_validator("binds")
    @classmethod
    def _targets_differ(cls, value: list[Bind], info: ValidationInfo) -> list[Bind]:
        seen = {t.path for t in info.data.get("tmpfs", ())}
        for bind in value:
            if bind.target in seen:
                raise ValueError(
                    f"{bind.target} is mounted twice (bind and tmpfs targets must differ)"
                )
            seen.add(bind.target)
        return value

    @field_validator("volumes")
    @classmethod
    def _volume_targets_differ(
        cls, value: list[VolumeMount], info: ValidationInfo
    ) -> list[VolumeMount]:
        seen = {t.path for t in info.data.get("tmpfs", ())}
        seen |= {b.target for b in info.data.get("binds", ())}
        for volume in value:
            if volume.target in seen:
                raise ValueError(
                    f"{volume.target} is mounted twice (volume, bind and tmpfs targets must differ)"
                )
            seen.add(volume.target)
        return value

    @field_validator("address")
    @classmethod
    def _address_needs_network(
        cls, value: ipaddress.IPv4Address | None, info: ValidationInfo
    ) -> ipaddress.IPv4Address | None:
        network = info.data.get("network")  # absent if it failed its own check
        if value is not None and network in ("host", "none"):
            raise ValueError(f"an address needs a declared network, not network: {network}")
        return value

    @field_validator("ports")
    @classmethod
    def _ports_need_network(cls, value: list[Port], info: ValidationInfo) -> list[Port]:
        network = info.data.get("network")  # absent if it failed its own check
        if value and network in ("host", "none"):
            raise ValueError(f"port forwards need a declared network, not network: {network}")
        return value

    @field_validator("depends_on")
    @classmethod
    def _not_on_itself(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("name") in value:
            raise ValueError("a machine cannot depend on itself")
        if len(set(value)) != len(value):
            raise ValueError("lists a machine twice")
        return value


def _parse_subnet(value: Any) -> Any:
    """A subnet must be its network address; say which one was meant if not."""
    if isinstance(value, str):
        try:
            ipaddress.ip_network(value)
        except ValueError as exc:
            try:
                loose = ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not a subnet such as 10.0.0.0/24") from exc
            raise ValueError(f"{value} has host bits set (did you mean {loose}?)") from exc
    return value


class Network(Model):
    """``kind: network``: a bridge with a subnet that machines attach to."""

    kind: Literal["network"]
    name: Name
    subnet: Annotated[
        ipaddress.IPv4Network, BeforeValidator(_parse_subnet, json_schema_input_type=str)
    ]
    subnet6: (
        Annotated[ipaddress.IPv6Network, BeforeValidator(_parse_subnet, json_schema_input_type=str)]
        | None
    ) = None
    gateway: ipaddress.IPv4Address | None = None
    bridge: Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,15}$")] | None = None
    nat: StrictBool = True

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in ("host", "none"):
            raise ValueError(
                f"{value!r} is reserved: machines use network: {value} without a declaration"
            )
        return value

    @field_validator("subnet")
    @classmethod
    def _subnet_size(cls, value: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
        if value.prefixlen > 30:
            raise ValueError(f"{value} is too small: use a /30 or larger")
        return value

    @field_validator("subnet6")
    @classmethod
    def _subnet6_size(
        cls, value: ipaddress.IPv6Network | None, info: ValidationInfo
    ) -> ipaddress.IPv6Network | None:
        subnet = info.data.get("subnet")
        if value is None or subnet is None:
            return value
        # A machine's IPv6 address takes the offset of its IPv4 address.
        if 128 - value.prefixlen < 32 - subnet.prefixlen:
            raise ValueError(
                f"{value} has fewer addresses than subnet {subnet}: "
                f"use a /{128 - (32 - subnet.prefixlen)} or larger"
            )
        return value

    @field_validator("gateway")
    @classmethod
    def _gateway_in_subnet(
        cls, value: ipaddress.IPv4Address | None, info: ValidationInfo
    ) -> ipaddress.IPv4Address | None:
        subnet = info.data.get("subnet")
        if value is None or subnet is None:
            return value
        if value not in subnet:
            raise ValueError(f"{value} is outside the subnet {subnet}")
        if value in (subnet.network_address, subnet.broadcast_address):
            raise ValueError(f"{value} is not a host address of {subnet}")
        return value

    @property
    def gateway_address(self) -> ipaddress.IPv4Address:
        """The gateway: the declared one, else the first host address."""
        return self.gateway or next(self.subnet.hosts())


def _check_owner(value: str) -> str:
    uid, sep, gid = value.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit() and len(uid) <= 10 and len(gid) <= 10):
        raise ValueError(f"{value!r} is not an owner: use 'UID:GID', numbers as in the machine")
    if max(int(uid), int(gid)) > 65534:
        raise ValueError(f"{value!r} is outside a machine's 65536 IDs (0 to 65534)")
    return value


Owner = Annotated[StrictStr, AfterValidator(_check_owner)]

MIN_VOLUME_SIZE = 1024 * 1024
"""The smallest quota of a volume: below it an empty directory and a few
files fill it."""


def _check_volume_size(value: int) -> int:
    if value < MIN_VOLUME_SIZE:
        raise ValueError(f"size {format_size(value)} is below 1M, the smallest size of a volume")
    return value


VolumeSize = Annotated[Size, AfterValidator(_check_volume_size)]


class Volume(Model):
    """``kind: volume``: data that outlives the roots of the machines using it."""

    kind: Literal["volume"]
    name: Name
    labels: dict[LabelKey, SafeText] = Field(default_factory=dict)
    owner: Owner | None = None  # of its top directory, as seen inside a machine
    # A project quota's hard limit on the blocks the volume takes; where the
    # filesystem of the volumes has none enforced, the plan refuses it.
    size: VolumeSize | None = None


class Bootstrap(Model):
    """What debootstrap makes a base image from."""

    suite: Annotated[StrictStr, Field(pattern=r"^[a-z][a-z0-9-]{1,30}$")]
    variant: Literal["minbase", "buildd", "standard"] = "minbase"
    mirror: Annotated[StrictStr, Field(pattern=r"^(https?|file)://[^\s\x00-\x1f]+$")] | None = None
    components: list[Annotated[StrictStr, Field(pattern=r"^[a-z][a-z0-9-]*$")]] = Field(
        default_factory=lambda: ["main"]
    )
    include: list[PackageName] = Field(default_factory=list)
    exclude: list[PackageName] = Field(default_factory=list)


class Image(Model):
    """``kind: image``: a root filesystem recipe, from debootstrap or another image."""

    kind: Literal["image"]
    name: Name
    from_: Name | None = Field(default=None, alias="from")
    bootstrap: Bootstrap | None = Field(default=None, validate_default=True)
    packages: list[PackageName] = Field(default_factory=list)
    script: Annotated[StrictStr, Field(max_length=1024 * 1024)] | None = None
    files: Files = Field(default_factory=list)

    @field_validator("bootstrap")
    @classmethod
    def _one_source(cls, value: Bootstrap | None, info: ValidationInfo) -> Bootstrap | None:
        parent = info.data.get("from_")
        if value is not None and parent is not None:
            raise ValueError("set either from (another image) or bootstrap, not both")
        if value is None and parent is None and "from_" in info.data:
            raise ValueError("missing: set bootstrap (debootstrap options) or from (another image)")
        return value

    @field_validator("from_")
    @classmethod
    def _not_from_itself(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and value == info.data.get("name"):
            raise ValueError("an image cannot be built from itself")
        return value


Declaration = Machine | Network | Image | Volume
KINDS: dict[str, type[Machine] | type[Network] | type[Image] | type[Volume]] = {
    "machine": Machine,
    "network": Network,
    "image": Image,
    "volume": Volume,
}
