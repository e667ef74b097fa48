"""eBPF instructions as the kernel takes them: opcodes and ``struct bpf_insn``.
Pure.

Only what pymachine's own programs use (the device allow-list of ``devprog``,
the ``[::1]`` connect redirect of ``sockprog``), written out by hand as
systemd's ``bpf-devices.c`` and runc's ``devicefilter.go`` do, so that no
compiler or libbpf is needed on the host.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Opcodes: class | operation | source (<linux/bpf_common.h>, <linux/bpf.h>).
LDX_MEM_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(src + off)
STX_MEM_W = 0x63  # BPF_STX | BPF_MEM | BPF_W: *(u32 *)(dst + off) = src
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: dst = imm64 (two instructions)
ALU32_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K: dst &= imm
ALU32_RSH_K = 0x74  # BPF_ALU | BPF_RSH | BPF_K: dst >>= imm
ALU32_MOV_K = 0xB4  # BPF_ALU | BPF_MOV | BPF_K: dst = imm
ALU32_MOV_X = 0xBC  # BPF_ALU | BPF_MOV | BPF_X: dst = src
ALU64_ADD_K = 0x07  # BPF_ALU64 | BPF_ADD | BPF_K: dst += imm
ALU64_MOV_X = 0xBF  # BPF_ALU64 | BPF_MOV | BPF_X: dst = src
JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K: if dst == imm, skip off instructions
JNE_K = 0x55  # BPF_JMP | BPF_JNE | BPF_K: if dst != imm, skip off instructions
JNE_X = 0x5D  # BPF_JMP | BPF_JNE | BPF_X: if dst != src, skip off instructions
CALL = 0x85  # BPF_JMP | BPF_CALL: r0 = helper imm (r1 to r5 its arguments)
EXIT = 0x95  # BPF_JMP | BPF_EXIT: return r0

# LD_IMM64's source register when its value is a map's fd, which the kernel
# turns into the map's address as it loads the program.
PSEUDO_MAP_FD = 1


@dataclass(frozen=True)
class Insn:
    """One ``struct bpf_insn``."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def encode(self) -> bytes:
        """The instruction's 8 bytes, in the host's (little-endian) order."""
        return struct.pack("<BBhi", self.code, self.dst | self.src << 4, self.off, self.imm)


def ld_imm64(dst: int, value: int, src: int = 0) -> tuple[Insn, Insn]:
    """The two instructions that load a 64-bit value (or, with
    ``src=PSEUDO_MAP_FD``, a map) into a register."""
    low = value & 0xFFFFFFFF
    high = (value >> 32) & 0xFFFFFFFF
    signed = [v - (1 << 32) if v >= 1 << 31 else v for v in (low, high)]
    return Insn(LD_IMM64, dst=dst, src=src, imm=signed[0]), Insn(0, imm=signed[1])


def program(insns: list[Insn]) -> bytes:
    """A program as the bytes BPF_PROG_LOAD takes."""
    return b"".join(insn.encode() for insn in insns)
