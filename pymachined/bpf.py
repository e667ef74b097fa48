"""bpf(2), the little of it pymachine uses: load a program, make a hash map
and change its entries, attach programs to a group of the unified cgroup tree,
and find attached programs (and their maps) again by id.

The edge for eBPF; the programs themselves are built by the pure
``core.devprog`` and ``core.sockprog``. Calls go through ctypes, so nothing
beyond the kernel is needed. Each failure raises OSError with the kernel's
errno (``LoadError`` with the verifier's log for a refused program).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# From <linux/bpf.h>.
SYSCALL = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280, "ppc64le": 361}
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_GET_FD_BY_ID = 13
MAP_GET_FD_BY_ID = 14
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16

MAP_TYPE_HASH = 1
PROG_TYPE_CGROUP_DEVICE = 15
PROG_TYPE_CGROUP_SOCK_ADDR = 18
CGROUP_DEVICE = 6
CGROUP_INET6_CONNECT = 11
# Programs attached below run too, and every one must allow.
F_ALLOW_MULTI = 2
LOG_SIZE = 1 << 16
LOAD_ATTEMPTS = 5  # as libbpf's sys_bpf_prog_load
ATTR_SIZE = 128  # larger than any field used; the kernel wants the rest zero
PROG_INFO_SIZE = 256  # struct bpf_prog_info up to its name, and beyond
PROG_INFO_NR_MAP_IDS = 52
PROG_INFO_MAP_IDS = 56
PROG_INFO_NAME = 64

_libc = ctypes.CDLL(None, use_errno=True)


class LoadError(OSError):
    """The kernel refused a program; ``log`` is the verifier's word on why."""

    def __init__(self, code: int, log: str) -> None:
        super().__init__(code, os.strerror(code))
        self.log = log


def call(command: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    """One bpf(2) call; its result, or raises OSError."""
    number = SYSCALL.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"bpf(2) is not known on {os.uname().machine}")
    result = int(
        _libc.syscall(ctypes.c_long(number), ctypes.c_int(command), attr, ctypes.c_uint(len(attr)))
    )
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _attr(*fields: tuple[int, str, int | bytes]) -> ctypes.Array[ctypes.c_char]:
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    for offset, kind, value in fields:
        struct.pack_into("=" + kind, attr, offset, value)
    return attr


def load_program(prog_type: int, program: bytes, name: bytes, expected_attach_type: int = 0) -> int:
    """Load a program; its fd."""
    insns = ctypes.create_string_buffer(program, len(program))
    license = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(LOG_SIZE)
    attr = _attr(
        (0, "I", prog_type),
        (4, "I", len(program) // 8),
        (8, "Q", ctypes.addressof(insns)),
        (16, "Q", ctypes.addressof(license)),
        (24, "I", 1),  # log_level
        (28, "I", LOG_SIZE),
        (32, "Q", ctypes.addressof(log)),
        (48, "16s", name),  # prog_name, for bpftool's listing and for finding it again
        (68, "I", expected_attach_type),
    )
    for attempt in range(LOAD_ATTEMPTS):
        try:
            return call(PROG_LOAD, attr)
        except OSError as exc:
            # EAGAIN: a signal interrupted the verifier; libbpf loads again too.
            if exc.errno == errno.EAGAIN and attempt + 1 < LOAD_ATTEMPTS:
                continue
            log_text = log.value.decode(errors="replace").strip()
            raise LoadError(exc.errno or errno.EINVAL, log_text) from exc
    raise AssertionError("unreachable")


def create_map(key_size: int, value_size: int, max_entries: int, name: bytes) -> int:
    """Make a hash map; its fd."""
    attr = _attr(
        (0, "I", MAP_TYPE_HASH),
        (4, "I", key_size),
        (8, "I", value_size),
        (12, "I", max_entries),
        (28, "16s", name),
    )
    return call(MAP_CREATE, attr)


def _elem(command: int, fd: int, key: bytes, value: bytes | None = None) -> None:
    key_buf = ctypes.create_string_buffer(key, len(key))
    fields: list[tuple[int, str, int | bytes]] = [
        (0, "I", fd),
        (8, "Q", ctypes.addressof(key_buf)),
    ]
    if value is not None:
        value_buf = ctypes.create_string_buffer(value, len(value))
        fields.append((16, "Q", ctypes.addressof(value_buf)))
    call(command, _attr(*fields))


def update(fd: int, key: bytes, value: bytes) -> None:
    """Set one entry of a map (made or replaced)."""
    _elem(MAP_UPDATE_ELEM, fd, key, value)


def delete(fd: int, key: bytes) -> None:
    """Delete one entry of a map; one that is not there is no error."""
    with contextlib.suppress(FileNotFoundError):
        _elem(MAP_DELETE_ELEM, fd, key)


def entries(fd: int, key_size: int, value_size: int) -> dict[bytes, bytes]:
    """Every entry of a hash map, as raw key and value."""
    found: dict[bytes, bytes] = {}
    current: ctypes.Array[ctypes.c_char] | None = None
    while True:
        following = ctypes.create_string_buffer(key_size)
        attr = _attr(
            (0, "I", fd),
            (8, "Q", ctypes.addressof(current) if current is not None else 0),
            (16, "Q", ctypes.addressof(following)),
        )
        try:
            call(MAP_GET_NEXT_KEY, attr)
        except FileNotFoundError:
            return found
        raw = ctypes.create_string_buffer(value_size)
        lookup = _attr(
            (0, "I", fd),
            (8, "Q", ctypes.addressof(following)),
            (16, "Q", ctypes.addressof(raw)),
        )
        with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
            call(MAP_LOOKUP_ELEM, lookup)
            found[following.raw] = raw.raw
        current = following


@contextlib.contextmanager
def _group(directory: Path) -> Iterator[int]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        yield fd
    finally:
        os.close(fd)


def attach(directory: Path, prog_fd: int, attach_type: int) -> None:
    """Attach a program to a group of the unified tree, beside any others
    (BPF_F_ALLOW_MULTI). It stays attached, after its fd is closed, until it
    is detached or the group goes."""
    with _group(directory) as group:
        call(PROG_ATTACH, _attach_attr(group, prog_fd, attach_type, F_ALLOW_MULTI))


def _attach_attr(
    group: int, prog_fd: int, attach_type: int, flags: int = 0
) -> ctypes.Array[ctypes.c_char]:
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("=IIII", attr, 0, group, prog_fd, attach_type, flags)
    return attr


def detach(directory: Path, prog_fd: int, attach_type: int) -> None:
    """Detach one program from a group."""
    with _group(directory) as group:
        call(PROG_DETACH, _attach_attr(group, prog_fd, attach_type))


def attached(directory: Path, attach_type: int) -> list[int]:
    """The ids of the programs attached to a group itself (not its parents')
    for one attach type; none for a group that is not there."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return []
    try:
        ids = (ctypes.c_uint32 * 64)()
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        struct.pack_into("=II", attr, 0, fd, attach_type)
        struct.pack_into("=QI", attr, 16, ctypes.addressof(ids), len(ids))
        call(PROG_QUERY, attr)
        count = struct.unpack_from("=I", attr, 24)[0]
        return list(ids[: min(count, len(ids))])
    finally:
        os.close(fd)


def program_fd(prog_id: int) -> int:
    """An fd of a loaded program, by id (OSError ENOENT once it is gone)."""
    return call(PROG_GET_FD_BY_ID, _attr((0, "I", prog_id)))


def map_fd(map_id: int) -> int:
    """An fd of a map, by id."""
    return call(MAP_GET_FD_BY_ID, _attr((0, "I", map_id)))


@dataclass(frozen=True)
class ProgramInfo:
    """What the kernel tells of a loaded program."""

    name: bytes
    map_ids: tuple[int, ...]


def program_info(fd: int) -> ProgramInfo:
    """A loaded program's name and the ids of the maps it uses."""
    ids = (ctypes.c_uint32 * 8)()
    info = ctypes.create_string_buffer(PROG_INFO_SIZE)
    struct.pack_into("=I", info, PROG_INFO_NR_MAP_IDS, len(ids))
    struct.pack_into("=Q", info, PROG_INFO_MAP_IDS, ctypes.addressof(ids))
    attr = _attr((0, "I", fd), (4, "I", PROG_INFO_SIZE), (8, "Q", ctypes.addressof(info)))
    call(OBJ_GET_INFO_BY_FD, attr)
    count = struct.unpack_from("=I", info, PROG_INFO_NR_MAP_IDS)[0]
    name = struct.unpack_from("=16s", info, PROG_INFO_NAME)[0].rstrip(b"\0")
    return ProgramInfo(name, tuple(ids[: min(count, len(ids))]))
