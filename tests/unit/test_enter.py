from __future__ import annotations

from pymachined.core import commands
from pymachined.core.parsers import Credentials
from pymachined.enter import environment, parse_args


def test_the_argv_commands_builds_is_the_one_enter_reads() -> None:
    argv = commands.enter_argv("py", 42, ["sh", "-c", "x"], ["A=1", "A=2"], "daemon", "/srv")
    options = parse_args(argv[3:])
    assert (options.pid, options.user, options.workdir) == (42, "daemon", "/srv")
    assert options.env == ["A=1", "A=2"]
    assert options.command == ["sh", "-c", "x"]
    options = parse_args(commands.enter_argv("py", 1, ["--pid=9", "-u"])[3:])
    assert (options.pid, options.user, options.command) == (1, None, ["--pid=9", "-u"])


def test_the_environment_is_nspawns_under_the_given_pairs_in_order() -> None:
    daemon = Credentials("daemon", 1, 1, (), "/usr/sbin", "/usr/sbin/nologin")
    env = environment(daemon, ["TERM=xterm", "HOME=/data", "A=x=y", "A=z"])
    assert env == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "container": "systemd-nspawn",
        "HOME": "/data",
        "USER": "daemon",
        "LOGNAME": "daemon",
        "SHELL": "/usr/sbin/nologin",
        "TERM": "xterm",
        "A": "z",
    }
