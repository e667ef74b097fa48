"""The [::1] connect redirect on paper: the program run by a small interpreter
of the instructions it uses, the map's entries, and what a sync writes."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from pymachined.core import bpfinsn, sockprog
from pymachined.core.parsers import Socket
from pymachined.core.sockprog import Target
from pymachined.core.spec import Port, Protocol

COOKIE = 0x1234_5678_9ABC
MAP_FD = 7
OWNER = sockprog.owner_tag("")
OTHER = sockprog.owner_tag("a1b2c3")
MACHINE6 = ipaddress.IPv6Address("fd42:217::2")


def ctx(address: str, port: int, kind: int = 1) -> bytearray:
    """A struct bpf_sock_addr for a connect of an IPv6 socket."""
    raw = bytearray(72)
    raw[8:24] = ipaddress.IPv6Address(address).packed
    raw[24:28] = sockprog.key(port)
    struct.pack_into("<I", raw, 32, kind)
    return raw


def run(program: bytes, context: bytearray, table: dict[bytes, bytes], cookie: int) -> int:
    """Run the program over a context; its return value. Memory: r1 points
    at the context, r10 at the stack's top, a lookup's result at the value."""
    insns = [struct.unpack_from("<BBhi", program, i) for i in range(0, len(program), 8)]
    regions: dict[str, bytearray] = {"ctx": context, "stack": bytearray(512)}
    regs: dict[int, tuple[str, int] | int] = {1: ("ctx", 0), 10: ("stack", 512)}
    pc = 0
    steps = 0
    while True:
        steps += 1
        assert steps < 1000, "the program loops"
        code, regs_byte, off, imm = insns[pc]
        dst, src = regs_byte & 0xF, regs_byte >> 4
        pc += 1
        if code == bpfinsn.LDX_MEM_W:
            region, base = regs[src]  # type: ignore[misc]
            regs[dst] = struct.unpack_from("<I", regions[region], base + off)[0]
        elif code == bpfinsn.STX_MEM_W:
            region, base = regs[dst]  # type: ignore[misc]
            struct.pack_into("<I", regions[region], base + off, regs[src])
        elif code == bpfinsn.LD_IMM64:
            high = insns[pc][3] & 0xFFFFFFFF
            pc += 1
            value = (imm & 0xFFFFFFFF) | high << 32
            regs[dst] = ("map", value) if src == bpfinsn.PSEUDO_MAP_FD else value
        elif code == bpfinsn.ALU64_MOV_X:
            regs[dst] = regs[src]
        elif code == bpfinsn.ALU64_ADD_K:
            region, base = regs[dst]  # type: ignore[misc]
            regs[dst] = (region, base + imm)
        elif code == bpfinsn.ALU32_MOV_K:
            regs[dst] = imm & 0xFFFFFFFF
        elif code in (bpfinsn.JNE_K, bpfinsn.JEQ_K, bpfinsn.JNE_X):
            left = regs[dst]
            right = regs[src] if code == bpfinsn.JNE_X else imm
            if (left == right) == (code == bpfinsn.JEQ_K):
                pc += off
        elif code == bpfinsn.CALL:
            if imm == sockprog.GET_NETNS_COOKIE:
                assert regs[1] == ("ctx", 0)
                regs[0] = cookie
            elif imm == sockprog.MAP_LOOKUP_ELEM:
                assert regs[1] == ("map", MAP_FD)
                region, base = regs[2]  # type: ignore[misc]
                found = table.get(bytes(regions[region][base : base + sockprog.KEY_SIZE]))
                if found is None:
                    regs[0] = 0
                else:
                    regions["value"] = bytearray(found)
                    regs[0] = ("value", 0)
            else:
                raise AssertionError(f"unknown helper {imm}")
            for clobbered in (1, 2, 3, 4, 5):
                regs.pop(clobbered, None)
        elif code == bpfinsn.EXIT:
            result = regs[0]
            assert isinstance(result, int)
            return result
        else:
            raise AssertionError(f"unknown opcode {code:#x}")


PROGRAM = sockprog.redirect_program(MAP_FD, COOKIE)
TABLE = {sockprog.key(8080): sockprog.value(Target(MACHINE6, 80, OWNER))}


def test_a_tcp_connect_to_loopback6_in_the_host_namespace_goes_to_the_machine() -> None:
    context = ctx("::1", 8080)
    assert run(PROGRAM, context, TABLE, COOKIE) == 1
    assert ipaddress.IPv6Address(bytes(context[8:24])) == MACHINE6
    assert sockprog.parse_key(bytes(context[24:28])) == 80


@pytest.mark.parametrize(
    ("address", "port", "kind", "cookie"),
    [
        ("::1", 8081, 1, COOKIE),  # a port not in the map
        ("::1", 8080, 1, COOKIE + 1),  # a machine's namespace: its own loopback
        ("::1", 8080, 2, COOKIE),  # UDP: the relay's
        ("::2", 8080, 1, COOKIE),
        ("fd42:217::1", 8080, 1, COOKIE),
        ("::ffff:127.0.0.1", 8080, 1, COOKIE),
        ("1::1", 8080, 1, COOKIE),
    ],
)
def test_every_other_connect_passes_untouched(
    address: str, port: int, kind: int, cookie: int
) -> None:
    context = ctx(address, port, kind)
    before = bytes(context)
    assert run(PROGRAM, context, TABLE, cookie) == 1
    assert bytes(context) == before


def test_the_cookie_and_the_map_are_64_bit_immediates() -> None:
    insns = sockprog.redirect_insns(MAP_FD, 1 << 40 | 5)
    loads = [i for i, insn in enumerate(insns) if insn.code == bpfinsn.LD_IMM64]
    assert len(loads) == 2
    cookie = insns[loads[0]], insns[loads[0] + 1]
    assert (cookie[0].imm, cookie[1].imm, cookie[1].code) == (5, 1 << 8, 0)
    assert insns[loads[1]].src == bpfinsn.PSEUDO_MAP_FD and insns[loads[1]].imm == MAP_FD
    assert sockprog.NAME.startswith(sockprog.PREFIX) and len(sockprog.NAME) < 16


def test_entries_round_trip() -> None:
    target = Target(MACHINE6, 5432, OTHER)
    assert sockprog.parse_value(sockprog.value(target)) == target
    assert sockprog.parse_key(sockprog.key(65535)) == 65535
    assert len(sockprog.value(target)) == sockprog.VALUE.size == 28
    assert OWNER != OTHER and len(OWNER) == 8


def test_targets_are_the_tcp_ports_published_on_loopback6() -> None:
    ports = [
        Port(host=8080, machine=80),
        Port(host=8443, machine=443, host_ip=ipaddress.IPv6Address("::1")),
        Port(host=8444, machine=443, host_ip=ipaddress.IPv6Address("::")),
        Port(host=5353, machine=53, protocol=Protocol.UDP),
        Port(host=9000, machine=9000, host_ip=ipaddress.IPv4Address("127.0.0.1")),
        Port(host=9001, machine=9001, host_ip=ipaddress.IPv6Address("fd00::1")),
    ]
    assert sockprog.targets(ports, MACHINE6, OWNER) == {
        8080: Target(MACHINE6, 80, OWNER),
        8443: Target(MACHINE6, 443, OWNER),
        8444: Target(MACHINE6, 443, OWNER),
    }


def test_listening_is_tcp_on_loopback6_or_everywhere() -> None:
    sockets = [
        Socket("tcp", ipaddress.IPv6Address("::1"), 1, 10),
        Socket("tcp", ipaddress.IPv6Address("::"), 2, 11),
        Socket("udp", ipaddress.IPv6Address("::1"), 3, 12),
        Socket("tcp", ipaddress.IPv4Address("127.0.0.1"), 4, 13),
        Socket("tcp", ipaddress.IPv6Address("fd00::1"), 5, 14),
    ]
    assert sockprog.listening(sockets) == {1, 2}


A = Target(MACHINE6, 80, OWNER)
B = Target(ipaddress.IPv6Address("fd42:218::2"), 80, OTHER)


@pytest.mark.parametrize(
    ("held", "want", "listening", "put", "delete"),
    [
        ({}, {}, set(), {}, []),
        ({}, {8080: A}, {8080}, {8080: A}, []),
        # no relay holds the port (yet): no entry
        ({}, {8080: A}, set(), {}, []),
        ({8080: A}, {8080: A}, {8080}, {}, []),
        # this root no longer wants it
        ({8080: A}, {}, {8080}, {}, [8080]),
        # another root's entry is kept while its relay holds the port ...
        ({9090: B}, {}, {9090}, {}, []),
        # ... and dropped once nothing does (that root ended with its relays)
        ({9090: B}, {}, set(), {}, [9090]),
        # a port another root holds is not taken over
        ({9090: B}, {9090: A}, {9090}, {}, []),
        # a changed target of this root's is rewritten
        (
            {8080: A},
            {8080: Target(MACHINE6, 81, OWNER)},
            {8080},
            {8080: Target(MACHINE6, 81, OWNER)},
            [],
        ),
    ],
)
def test_changes(
    held: dict[int, Target],
    want: dict[int, Target],
    listening: set[int],
    put: dict[int, Target],
    delete: list[int],
) -> None:
    assert sockprog.changes(held, want, OWNER, listening) == sockprog.Changes(put, delete)
