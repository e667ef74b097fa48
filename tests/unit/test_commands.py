"""Command lines are data: argv builders checked directly."""

from __future__ import annotations

from pathlib import PurePosixPath

from pymachined.core import commands
from pymachined.core.spec import Bootstrap


def test_cgroup_enter_keeps_the_command_intact() -> None:
    argv = commands.cgroup_enter_argv(
        [PurePosixPath("/sys/fs/cgroup/pids/pymachine/a/cgroup.procs")],
        ["systemd-nspawn", "--", "sh", "-c", "echo $$; exit 3"],
    )
    assert argv[:3] == ["/bin/sh", "-c", commands._ENTER]
    assert argv[3:] == [
        "sh",
        "/sys/fs/cgroup/pids/pymachine/a/cgroup.procs",
        "--",
        "systemd-nspawn",
        "--",
        "sh",
        "-c",
        "echo $$; exit 3",
    ]


def test_bootstrap_tools_take_the_same_recipe() -> None:
    recipe = Bootstrap.model_validate(
        {"suite": "bookworm", "include": ["curl"], "exclude": ["vim"], "components": ["main"]}
    )
    target = PurePosixPath("/img/rootfs")
    assert commands.bootstrap_argv("debootstrap", recipe, target, "http://m/debian") == [
        "debootstrap",
        "--variant=minbase",
        "--include=curl",
        "--exclude=vim",
        "bookworm",
        "/img/rootfs",
        "http://m/debian",
    ]
    assert commands.bootstrap_argv("mmdebstrap", recipe, target, "http://m/debian") == [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--components=main",
        "--include=curl,vim-",
        "bookworm",
        "/img/rootfs",
        "http://m/debian",
    ]


def test_isolation_wraps_without_touching_the_command() -> None:
    argv = commands.isolated_argv(["mmdebstrap", "--", "x"])
    assert argv[:4] == ["setpriv", "--pdeathsig", "KILL", "--"]
    assert "--kill-child" in argv and "--pid" in argv and "--mount" in argv
    assert "--mount-proc" in argv  # nspawn finds itself by its own pid there (systemd hosts)
    assert argv[-3:] == ["mmdebstrap", "--", "x"]


def test_enter_runs_the_confining_module_with_the_command_after_a_separator() -> None:
    argv = commands.enter_argv("/py", 42, ["--user", "x"], ["TERM=xterm", "A=b=c"])
    assert argv == [
        "/py",
        "-m",
        "pymachined.enter",
        "--pid=42",
        "--env=TERM=xterm",
        "--env=A=b=c",
        "--",
        "--user",
        "x",
    ]
    argv = commands.enter_argv("/py", 7, ["id"], user="daemon", workdir="/srv")
    assert argv[3:] == ["--pid=7", "--user=daemon", "--workdir=/srv", "--", "id"]


def test_overlay_mounts() -> None:
    lowers = [PurePosixPath("/img/b"), PurePosixPath("/img/a")]
    target = PurePosixPath("/m/rootfs")
    assert commands.overlay_mount_argv(lowers, target) == [
        "mount",
        "-t",
        "overlay",
        "-o",
        "nodev,lowerdir=/img/b:/img/a,ro",
        "--",
        "pymachine",
        "/m/rootfs",
    ]
    upper, work = PurePosixPath("/m/upper"), PurePosixPath("/m/work")
    argv = commands.overlay_mount_argv(lowers, target, upper, work, metacopy=True)
    assert (
        argv[4] == "nodev,lowerdir=/img/b:/img/a,upperdir=/m/upper,workdir=/m/work,"
        "redirect_dir=on,metacopy=on"
    )


def test_machine_roots_are_mounted_without_devices() -> None:
    target = PurePosixPath("/m/rootfs")
    assert commands.tmpfs_mount_argv(target)[4] == "mode=0700,nodev"
    assert commands.nodev_bind_argv(target) == [
        *("mount", "--bind", "-o", "nodev", "--"),
        *("/m/rootfs", "/m/rootfs"),
    ]


def test_the_log_stamper_gets_its_paths_from_the_environment() -> None:
    log = PurePosixPath("/var/lib/pymachine/machines/a $(x)/console.log")
    assert commands.log_stamp_environment(log, 10 * 1024**2, 123) == {
        "TZ": "UTC",
        "PYMACHINE_LOG": str(log),
        "PYMACHINE_LOG_OLD": f"{log}.1",
        "PYMACHINE_LOG_MAX": "10485760",
        "PYMACHINE_LOG_SIZE": "123",
    }
    argv = commands.log_stamp_argv()
    assert argv[:3] == ["mawk", "-W", "interactive"]
    script = argv[3]
    assert 'ENVIRON["PYMACHINE_LOG"]' in script  # the path is read, never part of the program
    assert '"$PYMACHINE_LOG" "$PYMACHINE_LOG_OLD"' in script.replace("\\", "")
    assert commands.rotated_log(log) == PurePosixPath(f"{log}.1")


def test_journal_argv_reads_a_machines_journal_in_utc() -> None:
    assert commands.journal_argv(False, None, None, False) == [
        "journalctl",
        "--no-pager",
        "--utc",
        "-o",
        "short",
    ]
    assert commands.journal_argv(True, 5, "2026-12-02 01:02:03", True) == [
        "journalctl",
        "--no-pager",
        "--utc",
        "-o",
        "short-iso",
        "--follow",
        "--lines=5",
        "--since=2026-12-02 01:02:03 UTC",
    ]


def test_a_build_step_gets_the_environment_it_is_given_and_no_more() -> None:
    root = PurePosixPath("/var/lib/pymachine/images/.build/merged")
    plain = commands.nspawn_run_argv(root, ["true"])
    assert not [a for a in plain if "proxy" in a.lower()]
    given = commands.nspawn_run_argv(
        root, ["true"], env={"https_proxy": "http://p:3128", "http_proxy": "http://p:3128"}
    )
    assert given[: given.index("--")][-2:] == [
        "--setenv=http_proxy=http://p:3128",
        "--setenv=https_proxy=http://p:3128",
    ]
    assert set(commands.PROXY_VARIABLES) >= {"http_proxy", "HTTPS_PROXY", "no_proxy"}
