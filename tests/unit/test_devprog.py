"""The BPF device program: run by a small interpreter of the opcodes it uses,
over devices and accesses, against the v1 devices controller's verdicts."""

from __future__ import annotations

import itertools
import struct

import pytest

from pymachined.core import bpfinsn, devprog
from pymachined.core.limits import DEVICE_ALLOW, Device

B, C = devprog.DEVCG_DEV_BLOCK, devprog.DEVCG_DEV_CHAR


def run(program: bytes, kind: int, major: int, minor: int, access: str) -> int:
    """Run a program's bytes on one device access, as the kernel would: strict
    about what it does not know, uninitialised registers and jumps out of the
    program."""
    assert len(program) % 8 == 0
    insns = [struct.unpack("<BBhi", program[i : i + 8]) for i in range(0, len(program), 8)]
    ctx = struct.pack("<III", kind | devprog.access_bits(access) << 16, major, minor)
    regs: dict[int, int] = {1: -1}  # r1: the context (a pointer, never a number)
    pc = 0
    for _ in range(10_000):
        assert 0 <= pc < len(insns), f"jump out of the program to {pc}"
        code, registers, off, imm = insns[pc]
        dst, src = registers & 0xF, registers >> 4
        pc += 1
        if code == bpfinsn.LDX_MEM_W:
            assert regs.get(src) == -1, "a load from something not the context"
            assert off in (0, 4, 8)
            regs[dst] = struct.unpack_from("<I", ctx, off)[0]
        elif code in (bpfinsn.ALU32_AND_K, bpfinsn.ALU32_RSH_K, bpfinsn.JNE_K):
            value = regs[dst]
            assert value >= 0, "arithmetic on the context pointer"
            if code == bpfinsn.ALU32_AND_K:
                regs[dst] = value & imm & 0xFFFFFFFF
            elif code == bpfinsn.ALU32_RSH_K:
                regs[dst] = value >> imm
            elif value != imm & 0xFFFFFFFF:
                pc += off
        elif code == bpfinsn.ALU32_MOV_K:
            regs[dst] = imm & 0xFFFFFFFF
        elif code == bpfinsn.ALU32_MOV_X:
            assert regs[src] >= 0
            regs[dst] = regs[src]
        elif code == bpfinsn.JNE_X:
            if regs[dst] != regs[src]:
                pc += off
        elif code == bpfinsn.EXIT:
            assert regs[0] in (0, 1)
            return regs[0]
        else:
            pytest.fail(f"unknown opcode {code:#x} at {pc - 1}")
    pytest.fail("the program does not end")


def v1_verdict(allow: tuple[Device, ...], kind: int, major: int, minor: int, access: str) -> int:
    """What a v1 devices group of ``deny a`` then the allow-list's lines says:
    allowed when one line matches the node and grants every access asked for."""
    for rule in allow:
        if devprog.KINDS[rule.kind] != kind:
            continue
        if rule.major not in (None, major) or rule.minor not in (None, minor):
            continue
        if set(access) <= set(rule.access):
            return 1
    return 0


PROGRAM = devprog.device_program()


@pytest.mark.parametrize(
    ("kind", "major", "minor", "access", "verdict"),
    [
        (C, 1, 3, "rw", 1),  # /dev/null
        (C, 1, 3, "r", 1),
        (C, 1, 3, "m", 1),
        (C, 1, 5, "rw", 1),  # /dev/zero
        (C, 1, 9, "r", 1),  # /dev/urandom
        (C, 5, 0, "rw", 1),  # /dev/tty
        (C, 5, 2, "rw", 1),  # /dev/ptmx
        (C, 136, 5, "rw", 1),  # a pty slave
        (C, 136, 5, "m", 1),  # c 136:* rw gives no m, c *:* m does
        (C, 1, 11, "r", 0),  # /dev/kmsg
        (C, 1, 1, "rw", 0),  # /dev/mem
        (C, 5, 1, "rw", 0),  # /dev/console
        (C, 10, 237, "rw", 0),  # /dev/loop-control
        (C, 10, 200, "rw", 0),  # /dev/net/tun: no spec field asks for it
        (C, 4, 0, "w", 0),  # a host tty
        (B, 7, 0, "r", 0),  # /dev/loop0
        (B, 7, 0, "w", 0),
        (B, 8, 0, "rw", 0),  # /dev/sda
        (B, 7, 0, "m", 1),  # any node may be made, as runc allows
        (B, 1, 3, "r", 0),  # a block device of /dev/null's numbers
        (C, 3, 1, "r", 0),  # the minor of another rule's major
        (C, 1, 136, "r", 0),
    ],
)
def test_the_default_program_allows_what_the_v1_rules_allow(
    kind: int, major: int, minor: int, access: str, verdict: int
) -> None:
    assert run(PROGRAM, kind, major, minor, access) == verdict
    assert v1_verdict(DEVICE_ALLOW, kind, major, minor, access) == verdict


ACCESSES = ["m", "r", "w", "rw", "rm", "wm", "rwm"]
NUMBERS = [0, 1, 3, 5, 7, 136, 255, 4095, 0xFFFFF]


@pytest.mark.parametrize(
    "allow",
    [
        DEVICE_ALLOW,
        (),
        (Device("all", "b", None, None, "rwm"),),
        (Device("r", "c", 1, None, "r"), Device("w", "c", None, 3, "w")),
        (Device("m", "c", 1, 3, "m"), Device("rw", "c", 1, 3, "rw")),
        (Device("big", "c", 0xFFFFF, 0xFFFFF, "wm"),),
    ],
    ids=["default", "empty", "block-all", "split-access", "split-rule", "big-numbers"],
)
def test_any_allow_list_decides_as_its_v1_lines(allow: tuple[Device, ...]) -> None:
    # A read and a write granted by two lines still deny a read-write open, as
    # in v1: each line must grant all of an access.
    program = devprog.device_program(allow)
    for kind, major, minor, access in itertools.product((B, C), NUMBERS, NUMBERS, ACCESSES):
        expected = v1_verdict(allow, kind, major, minor, access)
        assert run(program, kind, major, minor, access) == expected, (kind, major, minor, access)


def test_instructions_encode_as_struct_bpf_insn() -> None:
    # code, dst_reg:4 | src_reg:4 << 4, s16 off, s32 imm: little-endian.
    insn = bpfinsn.Insn(bpfinsn.JNE_X, dst=1, src=3, off=-2, imm=-1)
    assert insn.encode() == bytes([0x5D, 0x31, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
    assert bpfinsn.Insn(bpfinsn.EXIT).encode() == b"\x95" + bytes(7)
    assert PROGRAM[-16:] == bpfinsn.Insn(0xB4).encode() + bpfinsn.Insn(0x95).encode()


def test_a_rule_of_every_access_and_any_number_is_a_test_of_its_type_alone() -> None:
    insns = devprog.rule_insns(Device("all", "c", None, None, "rwm"))
    assert [i.code for i in insns] == [bpfinsn.JNE_K, bpfinsn.ALU32_MOV_K, bpfinsn.EXIT]
    assert insns[0].off == 2  # past the allow
