"""A machine's device allow-list as an eBPF program for the unified (v2)
cgroup tree. Pure.

cgroup v2 has no ``devices`` controller: the kernel instead runs the
BPF_PROG_TYPE_CGROUP_DEVICE programs attached to a task's cgroup (and its
ancestors) on every open and mknod of a device node. The program reads
``struct bpf_cgroup_dev_ctx {u32 access_type; u32 major; u32 minor;}``, the low
16 bits of ``access_type`` being the node's type and the high 16 the access
asked for, and returns 1 to allow, 0 to deny. It is compiled here the way
systemd's ``bpf-devices.c`` and runc's ``devicefilter.go`` compile theirs: one
block of tests per rule, the first rule that matches allows, and the end denies.
As in the v1 ``devices`` controller, a rule matches an access only when it
grants all of it (an ``O_RDWR`` open needs a rule with both ``r`` and ``w``).
"""

from __future__ import annotations

from collections.abc import Iterable

from pymachined.core import bpfinsn
from pymachined.core.bpfinsn import (
    ALU32_AND_K,
    ALU32_MOV_K,
    ALU32_MOV_X,
    ALU32_RSH_K,
    EXIT,
    JNE_K,
    JNE_X,
    LDX_MEM_W,
    Insn,
)
from pymachined.core.limits import DEVICE_ALLOW, Device

# From <linux/bpf.h>.
DEVCG_DEV_BLOCK = 1
DEVCG_DEV_CHAR = 2
DEVCG_ACC_MKNOD = 1
DEVCG_ACC_READ = 2
DEVCG_ACC_WRITE = 4
DEVCG_ACC_ALL = DEVCG_ACC_MKNOD | DEVCG_ACC_READ | DEVCG_ACC_WRITE

# The context's fields, by offset.
CTX_ACCESS_TYPE = 0
CTX_MAJOR = 4
CTX_MINOR = 8

KINDS = {"b": DEVCG_DEV_BLOCK, "c": DEVCG_DEV_CHAR}
ACCESS = {"m": DEVCG_ACC_MKNOD, "r": DEVCG_ACC_READ, "w": DEVCG_ACC_WRITE}


def access_bits(access: str) -> int:
    """The BPF_DEVCG_ACC_* bits of a v1 access string such as ``rwm``."""
    return sum(ACCESS[a] for a in set(access))


# r2 = type, r3 = access asked for, r4 = major, r5 = minor (r1 is the context).
PROLOGUE = (
    Insn(LDX_MEM_W, dst=2, src=1, off=CTX_ACCESS_TYPE),
    Insn(ALU32_AND_K, dst=2, imm=0xFFFF),
    Insn(LDX_MEM_W, dst=3, src=1, off=CTX_ACCESS_TYPE),
    Insn(ALU32_RSH_K, dst=3, imm=16),
    Insn(LDX_MEM_W, dst=4, src=1, off=CTX_MAJOR),
    Insn(LDX_MEM_W, dst=5, src=1, off=CTX_MINOR),
)
ALLOW = (Insn(ALU32_MOV_K, dst=0, imm=1), Insn(EXIT))
DENY = (Insn(ALU32_MOV_K, dst=0, imm=0), Insn(EXIT))


def rule_insns(device: Device) -> list[Insn]:
    """The tests of one rule, ending in an allow; a test that fails jumps past
    the rule's block to the next one."""
    tests: list[tuple[int, int, int]] = [(JNE_K, 2, KINDS[device.kind])]
    access = access_bits(device.access)
    if access != DEVCG_ACC_ALL:
        # Allowed when the access asked for has no bit beyond the rule's.
        tests.append((ALU32_MOV_X, 1, 3))
        tests.append((ALU32_AND_K, 1, access))
        tests.append((JNE_X, 1, 3))
    if device.major is not None:
        tests.append((JNE_K, 4, device.major))
    if device.minor is not None:
        tests.append((JNE_K, 5, device.minor))
    insns: list[Insn] = []
    for index, (code, dst, value) in enumerate(tests):
        # Skip the rest of the tests and the allow (whose length is 2).
        skip = len(tests) - index - 1 + len(ALLOW)
        if code == JNE_X:
            insns.append(Insn(code, dst=dst, src=value, off=skip))
        elif code == JNE_K:
            insns.append(Insn(code, dst=dst, off=skip, imm=value))
        elif code == ALU32_MOV_X:
            insns.append(Insn(code, dst=dst, src=value))
        else:
            insns.append(Insn(code, dst=dst, imm=value))
    return [*insns, *ALLOW]


def device_insns(allow: Iterable[Device] = DEVICE_ALLOW) -> list[Insn]:
    """The program that allows the devices of an allow-list and denies the rest."""
    insns = list(PROLOGUE)
    for device in allow:
        insns.extend(rule_insns(device))
    return [*insns, *DENY]


def device_program(allow: Iterable[Device] = DEVICE_ALLOW) -> bytes:
    """The allow-list's program as the bytes BPF_PROG_LOAD takes."""
    return bpfinsn.program(device_insns(allow))
