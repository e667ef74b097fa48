"""Project quotas on paper: the kernel's structures and numbers, the project
ids a volume may take, and ``/etc/projid``. Pure.

A volume with a ``size`` is a project of the filesystem it lives on: its
``data/`` directory carries a project id and the inherit flag, so every file
and directory made below it takes the same id, and the id's block hard limit
is the size. The edge that makes the calls is ``pymachined.quota``; what the
calls carry is packed and read here, so tests can check it on recorded bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass

# From <linux/fs.h>: struct fsxattr and its ioctls.
FSXATTR = struct.Struct("=5I8x")  # xflags, extsize, nextents, projid, cowextsize, pad
FS_IOC_FSGETXATTR = 0x801C581F  # _IOR('X', 31, struct fsxattr)
FS_IOC_FSSETXATTR = 0x401C5820  # _IOW('X', 32, struct fsxattr)
FS_XFLAG_PROJINHERIT = 0x200

# From <linux/quota.h> and <linux/dqblk_xfs.h>.
PRJQUOTA = 2
Q_GETQUOTA = 0x800007
Q_SETQUOTA = 0x800008
Q_XGETQSTATV = (ord("X") << 8) + 8
QIF_BLIMITS = 1
QIF_DQBLKSIZE = 1024  # the unit of if_dqblk's block limits
# struct if_dqblk: bhardlimit, bsoftlimit, curspace, ihardlimit, isoftlimit,
# curinodes, btime, itime (u64), valid (u32), padded to 8 bytes.
DQBLK = struct.Struct("=8QI4x")
# struct fs_quota_statv: version, pad, flags, incoredqs, three fs_qfilestatv
# (ino, nblks: u64; nextents, pad: u32), time limits (3 s32), warning limits
# (3 u16), pad3 (u16), pad4 (u32), pad2 (7 u64).
STATV = struct.Struct("=bBHI" + "QQII" * 3 + "3i" + "4H" + "I" + "7Q")
FS_QSTATV_VERSION1 = 1
FS_QUOTA_PDQ_ACCT = 1 << 4
FS_QUOTA_PDQ_ENFD = 1 << 5

FIRST_PROJECT = 1 << 20
"""The project ids pymachine gives volumes start here: above those an
administrator numbers by hand in /etc/projid, below 2**31."""
LAST_PROJECT = (1 << 31) - 1
TRIES = 64
"""How many project ids a new volume tries before giving up: each one taken
(by a record, /etc/projid or blocks on the filesystem) moves it one on."""


def qcmd(command: int, kind: int = PRJQUOTA) -> int:
    """The quotactl(2) command word: QCMD(command, type)."""
    return (command << 8) | (kind & 0xFF)


def project_candidates(scope: str, name: str) -> Iterator[int]:
    """The project ids a volume tries, in order: from a hash of the state
    root's scope and the volume's name, one on at a time, at most TRIES. The
    same volume of the same root always starts at the same id; two roots on one
    filesystem start apart."""
    span = LAST_PROJECT - FIRST_PROJECT + 1
    digest = hashlib.sha256(f"{scope}/{name}".encode()).digest()
    start = int.from_bytes(digest[:8], "big") % span
    for step in range(TRIES):
        yield FIRST_PROJECT + (start + step) % span


def limit_blocks(size: int) -> int:
    """A size in bytes as the quota's block limit: KiB, rounded up."""
    return -(-size // QIF_DQBLKSIZE)


def limit_bytes(size: int) -> int:
    """The limit a size sets, in bytes: the size rounded up to KiB."""
    return limit_blocks(size) * QIF_DQBLKSIZE


def pack_fsxattr(xflags: int, projid: int, rest: tuple[int, int, int] = (0, 0, 0)) -> bytes:
    """A struct fsxattr; rest is (extsize, nextents, cowextsize) as read."""
    extsize, nextents, cowextsize = rest
    return FSXATTR.pack(xflags, extsize, nextents, projid, cowextsize)


@dataclass(frozen=True)
class Attributes:
    """What FS_IOC_FSGETXATTR says of an inode."""

    xflags: int
    projid: int
    rest: tuple[int, int, int]  # extsize, nextents, cowextsize: written back unchanged

    @property
    def inherits(self) -> bool:
        """Whether what is made below it takes its project id."""
        return bool(self.xflags & FS_XFLAG_PROJINHERIT)


def parse_fsxattr(data: bytes) -> Attributes:
    """A struct fsxattr as the kernel filled it."""
    xflags, extsize, nextents, projid, cowextsize = FSXATTR.unpack(data)
    return Attributes(xflags, projid, (extsize, nextents, cowextsize))


@dataclass(frozen=True)
class Usage:
    """One project's quota: its block hard limit (bytes, 0 for none) and what
    it holds (bytes and inodes)."""

    limit: int
    used: int
    inodes: int

    @property
    def taken(self) -> bool:
        """Whether anything uses the id: blocks, inodes or a limit."""
        return bool(self.limit or self.used or self.inodes)


def pack_limit(size: int) -> bytes:
    """A struct if_dqblk that sets the block hard limit to size (0: none)
    and the soft limit to none, and nothing else."""
    return DQBLK.pack(limit_blocks(size), 0, 0, 0, 0, 0, 0, 0, QIF_BLIMITS)


def parse_dqblk(data: bytes) -> Usage:
    """A struct if_dqblk as Q_GETQUOTA filled it."""
    hard, _soft, space, _ihard, _isoft, inodes, _btime, _itime, _valid = DQBLK.unpack(data)
    return Usage(hard * QIF_DQBLKSIZE, space, inodes)


def pack_statv_request() -> bytes:
    """A struct fs_quota_statv for Q_XGETQSTATV: zero but its version."""
    return bytes([FS_QSTATV_VERSION1]) + bytes(STATV.size - 1)


def parse_statv(data: bytes) -> tuple[bool, bool]:
    """Whether project quotas are accounted, and enforced, from a struct
    fs_quota_statv as Q_XGETQSTATV filled it."""
    flags = STATV.unpack(data)[2]
    return bool(flags & FS_QUOTA_PDQ_ACCT), bool(flags & FS_QUOTA_PDQ_ENFD)


def parse_projid(text: str) -> dict[int, str]:
    """The project ids /etc/projid names (``name:id`` lines, ``#`` comments),
    id -> name; lines that are not such pairs are skipped, as quota tools do."""
    found: dict[int, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        name, sep, number = line.partition(":")
        if sep and name and number.strip().isdigit():
            found.setdefault(int(number.strip()), name.strip())
    return found
