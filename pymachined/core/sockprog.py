"""The ``[::1]`` connect redirect: an eBPF program of type
BPF_PROG_TYPE_CGROUP_SOCK_ADDR, attached as BPF_CGROUP_INET6_CONNECT, and the
entries of its map. Pure.

The kernel cannot DNAT ``::1`` to another host (IPv6 has no
``route_localnet``), so a published port on ``[::1]`` needs a relay, which
costs a second TCP connection per client. Instead, the kernel runs this
program at every ``connect(2)`` of an IPv6 socket in the groups below the one
it is attached to: a TCP connect to ``[::1]:PORT``, made in the host's network
namespace (its cookie is in the program), where PORT is in the map, gets its
destination rewritten to the machine's IPv6 address and port before the
connection is made, so the client talks to the machine directly, at the
kernel's speed, and the machine sees the client's real address (as Cilium's
socket load balancer does). Anything else passes untouched: other addresses,
UDP, and every process in a machine (its own ``::1`` is its own loopback).

The map: key the port as ``struct bpf_sock_addr.user_port`` holds it (network
order in the low 16 bits of a u32), value the machine's address (16 bytes),
its port (the same u32 layout) and the owner (the state root whose machine it
is, as 8 bytes), so that several roots share one program.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pymachined.core.bpfinsn import (
    ALU32_MOV_K,
    ALU64_ADD_K,
    ALU64_MOV_X,
    CALL,
    EXIT,
    JEQ_K,
    JNE_K,
    JNE_X,
    LDX_MEM_W,
    PSEUDO_MAP_FD,
    STX_MEM_W,
    Insn,
    ld_imm64,
    program,
)
from pymachined.core.parsers import Socket
from pymachined.core.spec import Port, Protocol

NAME = b"pymachine_c6v1"  # the program's name, how pymachine finds it again (< 16 bytes)
PREFIX = b"pymachine_c6"  # every version's, so that an upgrade replaces an older one
MAP_NAME = b"pymachine_c6map"
MAX_ENTRIES = 4096
KEY_SIZE = 4
VALUE = struct.Struct("=16s4s8s")

# struct bpf_sock_addr, by offset (<linux/bpf.h>).
CTX_USER_IP6 = 8  # u32[4], network order
CTX_USER_PORT = 24
CTX_TYPE = 32
SOCK_STREAM = 1
UNSPECIFIED = ipaddress.IPv6Address("::")
LOOPBACK = ipaddress.IPv6Address("::1")
LOOPBACK_LAST_WORD = 0x01000000  # the last u32 of ::1 as a little-endian load sees it

# Helpers (<linux/bpf.h>, enum bpf_func_id).
MAP_LOOKUP_ELEM = 1
GET_NETNS_COOKIE = 122


@dataclass(frozen=True)
class Target:
    """Where a connect to ``[::1]:port`` goes instead."""

    address: ipaddress.IPv6Address
    port: int
    owner: bytes  # 8 bytes: owner_tag of the state root


def owner_tag(scope: str) -> bytes:
    """The 8 bytes that mark a state root's entries ('' is the real root)."""
    return hashlib.sha256(b"pymachine-redirect\0" + scope.encode()).digest()[:8]


def key(port: int) -> bytes:
    """The map's key for a host port."""
    return struct.pack("!H", port) + bytes(2)


def parse_key(raw: bytes) -> int:
    """The host port of a map key."""
    return int(struct.unpack_from("!H", raw)[0])


def value(target: Target) -> bytes:
    """The map's value for a target."""
    return VALUE.pack(target.address.packed, key(target.port), target.owner)


def parse_value(raw: bytes) -> Target:
    """The target a map value holds."""
    address, port, owner = VALUE.unpack(raw[: VALUE.size])
    return Target(ipaddress.IPv6Address(address), parse_key(port), owner)


@dataclass(frozen=True)
class _Test:
    """A conditional jump to the program's end: its opcode, register and
    immediate (or, for JNE_X, source register)."""

    code: int
    dst: int
    operand: int


def redirect_insns(map_fd: int, netns_cookie: int) -> list[Insn]:
    """The program: rewrite a TCP connect to ``[::1]:PORT`` in the host's
    network namespace to the map's target for PORT; allow every connect."""
    allow: list[Insn] = [Insn(ALU32_MOV_K, dst=0, imm=1), Insn(EXIT)]
    body: list[Insn | _Test] = [
        Insn(ALU64_MOV_X, dst=6, src=1),  # r6 = ctx, kept across the calls
        Insn(LDX_MEM_W, dst=2, src=6, off=CTX_TYPE),
        _Test(JNE_K, 2, SOCK_STREAM),
        Insn(LDX_MEM_W, dst=2, src=6, off=CTX_USER_IP6),
        _Test(JNE_K, 2, 0),
        Insn(LDX_MEM_W, dst=2, src=6, off=CTX_USER_IP6 + 4),
        _Test(JNE_K, 2, 0),
        Insn(LDX_MEM_W, dst=2, src=6, off=CTX_USER_IP6 + 8),
        _Test(JNE_K, 2, 0),
        Insn(LDX_MEM_W, dst=2, src=6, off=CTX_USER_IP6 + 12),
        _Test(JNE_K, 2, LOOPBACK_LAST_WORD),
        Insn(ALU64_MOV_X, dst=1, src=6),
        Insn(CALL, imm=GET_NETNS_COOKIE),
        *ld_imm64(2, netns_cookie),
        _Test(JNE_X, 0, 2),
        Insn(LDX_MEM_W, dst=2, src=6, off=CTX_USER_PORT),
        Insn(STX_MEM_W, dst=10, src=2, off=-4),  # the key, on the stack
        Insn(ALU64_MOV_X, dst=2, src=10),
        Insn(ALU64_ADD_K, dst=2, imm=-4),
        *ld_imm64(1, map_fd, src=PSEUDO_MAP_FD),
        Insn(CALL, imm=MAP_LOOKUP_ELEM),
        _Test(JEQ_K, 0, 0),
        *(
            insn
            for word in range(4)
            for insn in (
                Insn(LDX_MEM_W, dst=2, src=0, off=4 * word),
                Insn(STX_MEM_W, dst=6, src=2, off=CTX_USER_IP6 + 4 * word),
            )
        ),
        Insn(LDX_MEM_W, dst=2, src=0, off=16),
        Insn(STX_MEM_W, dst=6, src=2, off=CTX_USER_PORT),
    ]
    # Each test jumps to the allow at the end when it fails.
    insns: list[Insn] = []
    for index, item in enumerate(body):
        if isinstance(item, Insn):
            insns.append(item)
            continue
        skip = len(body) - index - 1
        if item.code == JNE_X:
            insns.append(Insn(item.code, dst=item.dst, src=item.operand, off=skip))
        else:
            insns.append(Insn(item.code, dst=item.dst, off=skip, imm=item.operand))
    return [*insns, *allow]


def redirect_program(map_fd: int, netns_cookie: int) -> bytes:
    """The program as the bytes BPF_PROG_LOAD takes."""
    return program(redirect_insns(map_fd, netns_cookie))


def targets(
    ports: Iterable[Port], address: ipaddress.IPv6Address, owner: bytes
) -> dict[int, Target]:
    """The entries of a machine with an IPv6 address: each TCP port it
    publishes on ``::1`` (on every host address, ``::`` or ``::1`` itself)
    goes to that address."""
    return {
        port.host: Target(address, port.machine, owner)
        for port in ports
        if port.protocol is Protocol.TCP
        and (port.host_ip is None or port.host_ip in (UNSPECIFIED, LOOPBACK))
    }


def listening(sockets: Iterable[Socket]) -> set[int]:
    """The ports with a TCP listener on ``[::1]`` or ``[::]`` (host sockets
    as ``network.host_sockets`` reads them)."""
    return {s.port for s in sockets if s.protocol == "tcp" and s.address in (UNSPECIFIED, LOOPBACK)}


@dataclass(frozen=True)
class Changes:
    """What a sync writes into the map."""

    put: dict[int, Target]
    delete: list[int]


def changes(
    held: Mapping[int, Target],
    want: Mapping[int, Target],
    owner: bytes,
    listening: Iterable[int],
) -> Changes:
    """What to write so the map holds a root's wanted entries and keeps other
    roots' (decides only; pure). An entry, whoever's, is kept only while its
    port has a TCP listener on ``[::1]`` or ``[::]`` (the machine's relay,
    which holds the port on the host); a port with none is dropped, so that
    an entry left by a root that ended with its relays never redirects a
    port some other process takes later. Ports another root holds are not
    taken over."""
    alive = set(listening)
    put = {
        port: target
        for port, target in want.items()
        if port in alive
        and held.get(port) != target
        and (port not in held or held[port].owner == owner)
    }
    delete = sorted(
        port
        for port, target in held.items()
        if port not in alive or (target.owner == owner and port not in want)
    )
    return Changes(put, delete)
