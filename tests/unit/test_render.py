"""Rendering: golden files pin the output; a round trip pins the meaning."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pymachined.core import units
from pymachined.core.layout import Layout
from pymachined.core.render import RenderedFile, environment, machine_files, nspawn_run_argv
from pymachined.core.validate import SpecSet, load_set

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "spec.yaml").is_file())


def _load(repo: Path, spec: Path) -> SpecSet:
    return load_set([spec], repo / "machines")


def _render(repo: Path, spec_set: SpecSet, name: str) -> list[RenderedFile]:
    return machine_files(spec_set.machines[name], Layout(), repo / "templates")


@pytest.mark.parametrize("case", CASES)
def test_golden(repo: Path, case: str) -> None:
    spec_set = _load(repo, GOLDEN / case / "spec.yaml")
    for name in spec_set.machines:
        for rendered in _render(repo, spec_set, name):
            golden = GOLDEN / case / rendered.path.name
            if os.environ.get("PYMACHINE_UPDATE_GOLDEN") == "1":
                golden.write_text(rendered.content)
            assert golden.is_file(), f"missing golden file {golden} (PYMACHINE_UPDATE_GOLDEN=1)"
            assert rendered.content == golden.read_text(), f"{golden} differs from the rendering"


def _triples(content: str, *, exec_keys: bool) -> set[tuple[str, str, str | tuple[str, ...]]]:
    """(section, key, value) with word lists split as systemd splits them."""
    out: set[tuple[str, str, str | tuple[str, ...]]] = set()
    for entry in units.parse_unit(content):
        expands = exec_keys and entry.key != "CPUQuota"  # CPUQuota= expands no specifiers
        value = units.unescape_specifiers(entry.value) if expands else entry.value
        if entry.key in ("ExecStart", "Parameters", "Environment", "Requires"):
            words = units.split_words(value, exec_line=entry.key == "ExecStart", escapes=exec_keys)
            out.add((entry.section, entry.key, tuple(words)))
        else:
            out.add((entry.section, entry.key, value))
    return out


def test_round_trip_nspawn_file(repo: Path) -> None:
    spec_set = _load(repo, GOLDEN / "full" / "spec.yaml")
    nspawn, _ = _render(repo, spec_set, "web")
    assert _triples(nspawn.content, exec_keys=False) == {
        ("Exec", "Boot", "no"),
        (
            "Exec",
            "Parameters",
            (
                "sh",
                "-c",
                'echo "100% of $HOME" {{7*7}} \\back\\slash; exec sleep infinity',
                "two words",
            ),
        ),
        ("Exec", "Environment", ("GREETING=hello world",)),
        ("Exec", "Environment", ("PERCENT=50%",)),
        ("Exec", "Environment", ('QUOTE=say "hi"',)),
        ("Exec", "Environment", ("TEMPLATE={{ 7*7 }}",)),
        ("Exec", "User", "www-data"),
        ("Exec", "WorkingDirectory", "/srv/www"),
        ("Exec", "Hostname", "web"),
        ("Exec", "PrivateUsers", "pick"),
        ("Exec", "Capability", "CAP_NET_ADMIN"),
        ("Exec", "DropCapability", "CAP_MKNOD CAP_SYS_CHROOT"),
        ("Exec", "NoNewPrivileges", "yes"),
        ("Exec", "KillSignal", "SIGTERM"),
        ("Exec", "SystemCallFilter", "@mount"),
        ("Exec", "SystemCallFilter", "~kexec_load bpf"),
        ("Exec", "ResolvConf", "off"),  # nspawn cannot tell its network is private
        ("Files", "ReadOnly", "yes"),
        ("Files", "PrivateUsersOwnership", "auto"),
        # Binds come from their staging mounts, where each source is mounted
        # before a start; the sources themselves are in the run spec.
        ("Files", "BindReadOnly", "/var/lib/pymachine/machines/web/binds/0:/data"),
        ("Files", "Bind", "/var/lib/pymachine/machines/web/binds/1:/cache"),
        ("Files", "TemporaryFileSystem", "/tmp:mode=1777"),
        ("Files", "TemporaryFileSystem", f"/run:mode=1777,size={64 * 1024 * 1024}"),
        # web is on a declared network: its unit enters the namespace.
        ("Network", "Private", "no"),
    }


def test_round_trip_unit_file(repo: Path) -> None:
    spec_set = _load(repo, GOLDEN / "full" / "spec.yaml")
    _, service = _render(repo, spec_set, "web")
    assert _triples(service.content, exec_keys=True) == {
        ("Unit", "Description", "pymachine machine web"),
        ("Unit", "Documentation", "man:systemd-nspawn(1)"),
        ("Unit", "PartOf", "machines.target"),
        ("Unit", "Before", "machines.target"),
        (
            "Unit",
            "After",
            "network.target systemd-resolved.service pymachine-apply.service pymachine-db.service",
        ),
        ("Unit", "Requires", ("pymachine-db.service",)),
        ("Unit", "RequiresMountsFor", "/var/lib/pymachine/machines/web"),
        ("Service", "ExecStartPre", "pymachine --root=/ prepare -- web"),
        ("Service", "ExecStartPost", "pymachine --root=/ forward-ports -- web"),
        (
            "Service",
            "ExecStart",
            (
                "/usr/bin/nsenter",
                "--net=/run/netns/pm-web",
                "--",
                "/usr/bin/systemd-nspawn",
                "--quiet",
                "--keep-unit",
                "--register=yes",
                "--machine=web",
                "--directory=/var/lib/pymachine/machines/web/rootfs",
            ),
        ),
        ("Service", "Type", "notify"),
        ("Service", "KillMode", "mixed"),
        ("Service", "Delegate", "yes"),
        ("Service", "DevicePolicy", "closed"),
        ("Service", "DeviceAllow", "char-* m"),
        ("Service", "DeviceAllow", "block-* m"),
        ("Service", "DeviceAllow", "/dev/null rwm"),
        ("Service", "DeviceAllow", "/dev/zero rwm"),
        ("Service", "DeviceAllow", "/dev/full rwm"),
        ("Service", "DeviceAllow", "/dev/random rwm"),
        ("Service", "DeviceAllow", "/dev/urandom rwm"),
        ("Service", "DeviceAllow", "/dev/tty rwm"),
        ("Service", "DeviceAllow", "/dev/ptmx rwm"),
        ("Service", "DeviceAllow", "char-pts rw"),
        ("Service", "Slice", "machine.slice"),
        ("Service", "RestartForceExitStatus", "133"),
        ("Service", "SuccessExitStatus", "133"),
        ("Service", "Restart", "always"),
        ("Service", "TimeoutStopSec", "30s"),
        ("Service", "MemoryMax", str(512 * 1024 * 1024)),
        ("Service", "MemoryHigh", str(256 * 1024 * 1024)),
        ("Service", "CPUQuota", "150%"),
        ("Service", "TasksMax", "128"),
        ("Service", "CPUWeight", "200"),
        ("Service", "IOWeight", "50"),
        ("Install", "WantedBy", "machines.target"),
    }


def test_every_file_carries_the_owner_marker(repo: Path) -> None:
    for case in CASES:
        spec_set = _load(repo, GOLDEN / case / "spec.yaml")
        for name in spec_set.machines:
            for rendered in _render(repo, spec_set, name):
                assert rendered.content.startswith("# pymachine-owner:")


def test_user_text_is_never_a_template(repo: Path) -> None:
    spec_set = _load(repo, GOLDEN / "full" / "spec.yaml")
    nspawn, _ = _render(repo, spec_set, "web")
    assert "{{ 7*7 }}" in nspawn.content
    assert "49" not in nspawn.content


def test_a_value_without_a_filter_is_refused(repo: Path) -> None:
    template = environment(repo / "templates").from_string("Key={{ value }}\n")
    with pytest.raises(units.UnsafeValue, match="without the unit or nspawn filter"):
        template.render(value="plain")
    assert template.render(value=True) == "Key=yes\n"


def test_undefined_names_are_errors(repo: Path) -> None:
    import jinja2

    template = environment(repo / "templates").from_string("Key={{ missing | unit }}\n")
    with pytest.raises(jinja2.UndefinedError):
        template.render()


def test_render_respects_root(repo: Path, tmp_path: Path) -> None:
    from pathlib import PurePosixPath

    spec_set = _load(repo, GOLDEN / "minimal" / "spec.yaml")
    layout = Layout(PurePosixPath(tmp_path))
    files = machine_files(spec_set.machines["minimal"], layout, repo / "templates")
    assert [f.path for f in files] == [
        PurePosixPath(tmp_path) / "etc/systemd/nspawn/minimal.nspawn",
        PurePosixPath(tmp_path) / "etc/systemd/system/pymachine-minimal.service",
    ]
    assert f"--directory={tmp_path}/var/lib/pymachine/machines/minimal/rootfs" in files[1].content


@pytest.mark.parametrize(
    ("security", "rootfs", "users", "ownership"),
    [
        ("{}", "overlay", "524288:65536", "off"),  # its layers are mapped to its range
        ("{}", "ephemeral", "524288:65536", "off"),
        ("{}", "copy", "524288:65536", "auto"),  # nspawn maps or shifts a copy
        ("{private_users: false}", "overlay", "no", "off"),
    ],
)
def test_a_machines_range_reaches_nspawn(
    repo: Path, tmp_path: Path, security: str, rootfs: str, users: str, ownership: str
) -> None:
    spec = tmp_path / "m.yaml"
    spec.write_text(f'name: m\ncommand: ["true"]\nrootfs: {rootfs}\nsecurity: {security}\n')
    machine = _load(repo, spec).machines["m"]
    nspawn, _ = machine_files(machine, Layout(), repo / "templates", uid_base=524288)
    found = _triples(nspawn.content, exec_keys=False)
    assert ("Exec", "PrivateUsers", users) in found
    assert ("Files", "PrivateUsersOwnership", ownership) in found
    argv = nspawn_run_argv(machine, Layout(), 524288)
    assert f"--private-users={users}" in argv
    assert f"--private-users-ownership={ownership}" in argv
