"""The CLI in-process: exit codes, output for people, JSON Schema."""

from __future__ import annotations

import json
import sys
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

from pymachined import cli


def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["pymachine", *args])
    with pytest.raises(SystemExit) as done:
        cli.main()
    out, err = capsys.readouterr()
    code = done.value.code
    return (code if isinstance(code, int) else 0), out, err


def test_validate_examples(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "validate", str(repo / "specs"))
    assert (code, err) == (0, "")
    assert out.startswith("ok: 2 machines")


def test_validate_reports_file_line_field_and_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "web.yaml"
    spec.write_text("name: web\ncommand: [x]\nresourcse:\n  memory: 1G\n")
    code, out, err = run_cli(monkeypatch, capsys, "validate", str(spec))
    assert code == 1
    assert out == ""
    assert err.splitlines()[0] == (
        f"error: {spec}:3:1: resourcse: unknown field 'resourcse' (hint: did you mean 'resources'?)"
    )
    assert "Traceback" not in err


def test_debug_shows_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "web.yaml"
    spec.write_text("name: Web\ncommand: [x]\n")
    code, _, err = run_cli(monkeypatch, capsys, "--debug", "validate", str(spec))
    assert code == 1
    assert "Traceback" in err


def test_usage_errors_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(monkeypatch, capsys, "no-such-command")[0] == 2
    assert run_cli(monkeypatch, capsys, "validate")[0] == 2
    assert run_cli(monkeypatch, capsys, "--bogus")[0] == 2


def test_version(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(monkeypatch, capsys, "--version")
    assert (code, out) == (0, "pymachine 0.1.0\n")


def test_render_prints_both_files(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(monkeypatch, capsys, "render", str(repo / "specs"), "hello")
    assert code == 0
    assert "### /etc/systemd/nspawn/hello.nspawn" in out
    assert "### /etc/systemd/system/pymachine-hello.service" in out


def test_render_under_root(
    repo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PYMACHINE_ROOT", str(tmp_path))
    code, out, _ = run_cli(monkeypatch, capsys, "render", str(repo / "specs"), "hello")
    assert code == 0
    assert f"### {tmp_path}/etc/systemd/nspawn/hello.nspawn" in out
    assert not any(tmp_path.iterdir()), "render must not write anything"


def test_render_unknown_machine_exits_1(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "render", str(repo / "specs"), "nope")
    assert code == 1
    assert "error: no machine named 'nope'" in err
    assert "hint: machines declared: base, hello" in err


def test_schema_accepts_the_examples_and_rejects_typos(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomllib

    code, out, _ = run_cli(monkeypatch, capsys, "schema")
    assert code == 0
    schema = json.loads(out)
    validator = jsonschema.Draft202012Validator(schema)
    documents: list[object] = []
    for path in sorted((repo / "specs").iterdir()) + sorted((repo / "machines").iterdir()):
        if path.suffix == ".toml":
            documents.append(tomllib.loads(path.read_text()))
        elif path.suffix in (".yaml", ".yml"):
            documents.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    assert len(documents) >= 5
    for document in documents:
        validator.validate(document)
    assert not validator.is_valid({"name": "x", "command": ["y"], "resourcse": {}})


def test_logs_since_and_timestamps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pymachined.core.layout import Layout
    from pymachined.core.records import MachineRecord
    from pymachined.state import StateStore

    layout = Layout(PurePosixPath(tmp_path))
    StateStore(layout).put(MachineRecord(name="web", config_hash="x", layers=()))
    log = tmp_path / "var/lib/pymachine/machines/web/console.log"
    log.write_text(
        "2020-01-01T00:00:00Z old\n"
        "unstamped\n"
        "2999-01-01T00:00:00Z future\n"
        "2999-01-01T00:00:01Z  spaced\n"
    )
    root = ["--root", str(tmp_path)]
    code, out, _ = run_cli(monkeypatch, capsys, *root, "logs", "web")
    assert (code, out) == (0, "old\nunstamped\nfuture\n spaced\n")
    code, out, _ = run_cli(monkeypatch, capsys, *root, "logs", "web", "--since", "1h")
    assert (code, out) == (0, "future\n spaced\n")
    code, out, _ = run_cli(
        monkeypatch, capsys, *root, "logs", "web", "-t", "--since", "2999-01-01T00:00:01"
    )
    assert (code, out) == (0, "2999-01-01T00:00:01Z  spaced\n")
    code, _, err = run_cli(monkeypatch, capsys, *root, "logs", "web", "--since", "soon")
    assert code == 2 and "--since" in err


@pytest.mark.parametrize(
    "args",
    [
        ["destroy", "--yes", "ta-h/"],
        ["destroy", "--yes", "ta-h/."],
        ["inspect", "a/../ta-h"],
        ["stop", "../machines/ta-h"],
        ["start", ""],
        ["exec", "ta-h/", "--", "true"],
        ["logs", "ta-h/"],
        ["stats", "ok", "ta-h/"],
        ["network", "rm", "net/"],
        ["network", "inspect", "../net"],
        ["image", "rm", "img/.."],
        ["render", ".", "ta-h/"],
    ],
)
def test_names_on_the_command_line_follow_the_spec_rule(
    args: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A machine's directory that a path-like name would reach ("ta-h/" is
    # machines/ta-h): it must survive, and the error says which name is wrong.
    machine = tmp_path / "var/lib/pymachine/machines/ta-h"
    (machine / "upper").mkdir(parents=True)
    (machine / "state.json").write_text("{}")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    code, out, err = run_cli(monkeypatch, capsys, "--root", str(tmp_path), *args)
    assert code == 1
    assert out == ""
    assert "is not a valid name" in err or "must not be empty" in err
    assert "hint: " in err and "nothing was changed" in err
    assert "Traceback" not in err and "internal error" not in err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_a_root_is_resolved_once_for_every_scope(tmp_path: Path) -> None:
    from pymachined.files import host_layout

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    layout = host_layout(real)
    assert host_layout(tmp_path / "link") == layout
    assert host_layout(tmp_path / "link" / ".." / "real") == layout
    assert layout.scope != "" and layout.cgroup_name("web") == f"pymachine/{layout.scope}-web"
    assert host_layout(Path("/")).cgroup_name("web") == "pymachine/web"
