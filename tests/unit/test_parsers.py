"""Parsers of host facts and logs: text in, values out."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from pymachined.core.parsers import (
    CgroupMembership,
    Confinement,
    Credentials,
    cgroup_directory,
    parse_log_line,
    parse_mountinfo,
    parse_proc_cgroup,
    parse_proc_status,
    resolve_user,
)


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("2026-11-28T10:00:00Z hello\n", ("2026-11-28T10:00:00Z", "hello\n")),
        ("2026-11-28T10:00:00Z \n", ("2026-11-28T10:00:00Z", "\n")),
        ("2026-11-28T10:00:00Z  indented\n", ("2026-11-28T10:00:00Z", " indented\n")),
        ("hello\n", (None, "hello\n")),
        ("2026-11-28 10:00:00 not ours\n", (None, "2026-11-28 10:00:00 not ours\n")),
    ],
)
def test_log_lines(line: str, parsed: tuple[str | None, str]) -> None:
    assert parse_log_line(line) == parsed


# Recorded from the PID 1 of a default machine (user namespace) under pymachined.
STATUS = """\
Name:\tpython3
Umask:\t0022
State:\tS (sleeping)
Uid:\t0\t0\t0\t0
Gid:\t0\t0\t0\t0
Groups:\t
NoNewPrivs:\t0
Seccomp:\t2
Seccomp_filters:\t1
CapInh:\t0000000000000000
CapPrm:\t00000000fdecbfff
CapEff:\t00000000fdecbfff
CapBnd:\t00000000fdecbfff
CapAmb:\t0000000000000000
Speculation_Store_Bypass:\tthread vulnerable
"""

CGROUP = """\
12:pids:/pymachine/web/payload
11:blkio:/pymachine/web/payload
3:cpuset:/
1:name=systemd:/pymachine/web/payload
0::/pymachine/web/payload
"""

MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
36 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
37 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_proc_status_gives_the_confinement() -> None:
    confinement = parse_proc_status(STATUS)
    assert confinement == Confinement(
        cap_inh=0,
        cap_prm=0xFDECBFFF,
        cap_eff=0xFDECBFFF,
        cap_bnd=0xFDECBFFF,
        cap_amb=0,
        no_new_privs=False,
        seccomp=2,
        seccomp_filters=1,
    )
    assert parse_proc_status(STATUS.replace("NoNewPrivs:\t0", "NoNewPrivs:\t1")).no_new_privs
    with pytest.raises(ValueError, match="CapBnd"):
        parse_proc_status(STATUS.replace("CapBnd", "Cap"))


def test_proc_cgroup_lines_map_to_the_mounted_hierarchies() -> None:
    memberships = parse_proc_cgroup(CGROUP)
    assert memberships[0] == CgroupMembership(
        12, ("pids",), PurePosixPath("/pymachine/web/payload")
    )
    assert memberships[-1] == CgroupMembership(0, (), PurePosixPath("/pymachine/web/payload"))
    mounts = parse_mountinfo(MOUNTINFO)
    found = [cgroup_directory(m, mounts) for m in memberships]
    assert found == [
        PurePosixPath("/sys/fs/cgroup/pids/pymachine/web/payload"),
        PurePosixPath("/sys/fs/cgroup/blkio/pymachine/web/payload"),
        None,  # cpuset is not mounted here
        PurePosixPath("/sys/fs/cgroup/systemd/pymachine/web/payload"),
        PurePosixPath("/sys/fs/cgroup/unified/pymachine/web/payload"),
    ]
    with pytest.raises(ValueError, match="not a /proc/PID/cgroup line"):
        parse_proc_cgroup("12:pids\n")


def test_a_cgroup_namespace_root_below_the_group_is_not_followed() -> None:
    # A mount whose root is a group of its own (as in a cgroup namespace) holds
    # only the groups below that one.
    mounts = parse_mountinfo("41 31 0:38 /machine.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    inside = CgroupMembership(0, (), PurePosixPath("/machine.slice/m.service/payload"))
    outside = CgroupMembership(0, (), PurePosixPath("/user.slice"))
    assert cgroup_directory(inside, mounts) == PurePosixPath("/sys/fs/cgroup/m.service/payload")
    assert cgroup_directory(outside, mounts) is None


PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
broken line
evil:x:-1:99999999999:::
app:x:1000:1000::/home/app:
"""
GROUP = """\
root:x:0:
daemon:x:1:
adm:x:4:app,daemon
staff:x:50:app
app:x:1000:
"""


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("root", Credentials("root", 0, 0, (), "/root", "/bin/bash")),
        ("0", Credentials("root", 0, 0, (), "/root", "/bin/bash")),
        ("daemon", Credentials("daemon", 1, 1, (4,), "/usr/sbin", "/usr/sbin/nologin")),
        ("app", Credentials("app", 1000, 1000, (4, 50), "/home/app", "/bin/sh")),
        ("app:staff", Credentials("app", 1000, 50, (4, 50), "/home/app", "/bin/sh")),
        ("app:7", Credentials("app", 1000, 7, (4, 50), "/home/app", "/bin/sh")),
        ("4242", Credentials("4242", 4242, 4242, (), "/", "/bin/sh")),
    ],
)
def test_users_resolve_in_the_machines_own_files(user: str, expected: Credentials) -> None:
    assert resolve_user(user, PASSWD, GROUP) == expected


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("nobody", "no user 'nobody'"),
        ("evil", "no user 'evil'"),  # ids out of range are not taken
        ("app:wheel", "no group 'wheel'"),
        ("-1", "no user '-1'"),
    ],
)
def test_unknown_users_and_groups_are_refused(user: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_user(user, PASSWD, GROUP)


def test_the_signal_that_killed_a_payload_is_read_from_nspawns_last_words() -> None:
    from pymachined.core.parsers import STARTING_MARK, parse_payload_signal

    earlier = f"2026-12-01T10:00:00Z {STARTING_MARK}db\nContainer db terminated by signal KILL.\n"
    now = f"2026-12-01T10:01:00Z {STARTING_MARK}db\nup\n"
    assert parse_payload_signal(now + "Container db terminated by signal KILL.\n") == 9
    assert parse_payload_signal(now + "Container db terminated by signal SEGV.\n") == 11
    assert parse_payload_signal(earlier + now) is None  # an earlier run's death is not this one's
    assert parse_payload_signal(now + "Container db terminated by signal NOPE.\n") is None


def test_mounts_at_one_point_parse_only_its_lines() -> None:
    from pymachined.core.parsers import mounts_at

    text = (
        "36 35 0:30 / /srv/a\\040b rw - overlay x rw,lowerdir=/l\n"
        "37 36 0:31 / /srv/a\\040b/c rw - tmpfs t rw\n"
        "38 35 0:32 / /srv/a\\040b rw - overlay y rw,lowerdir=/m\n"
        "not a mountinfo line at all\n"
    )
    found = mounts_at(text, PurePosixPath("/srv/a b"))
    assert [(m.mount_id, m.options) for m in found] == [
        (36, "rw,lowerdir=/l"),
        (38, "rw,lowerdir=/m"),
    ]
    assert mounts_at(text, PurePosixPath("/srv/a")) == []


def test_mounts_under_a_path_deepest_first_parse_only_the_lines_below_it() -> None:
    from pymachined.core.parsers import mounts_under

    text = (
        "36 35 0:30 / /srv/a\\040b rw - overlay x rw\n"
        "37 36 0:31 / /srv/a\\040b/c/d rw - tmpfs t rw\n"
        "38 36 0:32 / /srv/a\\040b/c rw - tmpfs t rw\n"
        "39 35 0:33 / /srv/a\\040bc rw - tmpfs t rw\n"  # a sibling, not below
        "not a mountinfo line at all\n"
    )
    under = [str(p) for p in mounts_under(text, PurePosixPath("/srv/a b"))]
    assert under == ["/srv/a b/c/d", "/srv/a b/c", "/srv/a b"]
    assert mounts_under(text, PurePosixPath("/srv/a b/c/d")) == [PurePosixPath("/srv/a b/c/d")]
    assert mounts_under(text, PurePosixPath("/srv/z")) == []
