"""The loader: files found, documents read, positions kept, problems collected."""

from __future__ import annotations

from pathlib import Path

import pytest

from pymachined.core.load import collect, discover
from pymachined.core.spec import Image, Machine, Network
from pymachined.errors import SpecError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_discover_is_recursive_sorted_and_skips_hidden(tmp_path: Path) -> None:
    for name in ["b.yaml", "a.toml", "sub/c.yml", ".hidden.yaml", ".git/x.yaml", "notes.txt"]:
        write(tmp_path / name, "")
    assert [p.relative_to(tmp_path).as_posix() for p in discover(tmp_path)] == [
        "a.toml",
        "b.yaml",
        "sub/c.yml",
    ]


def test_discover_a_single_file_and_a_missing_path(tmp_path: Path) -> None:
    file = write(tmp_path / "x.txt", "")
    assert discover(file) == [file]
    with pytest.raises(SpecError, match="problem"):
        discover(tmp_path / "missing")


def test_several_documents_per_yaml_file(tmp_path: Path) -> None:
    write(
        tmp_path / "all.yaml",
        "---\nname: a\ncommand: [/bin/true]\n---\n---\n"
        "kind: network\nname: n\nsubnet: 10.9.0.0/24\n"
        "---\nkind: image\nname: i\nfrom: debian-bookworm\n",
    )
    found, problems = collect([tmp_path])
    assert problems == []
    assert [type(d.spec) for d in found] == [Machine, Network, Image]
    assert found[1].where == f"{tmp_path / 'all.yaml'}:6"


def test_toml_arrays_of_tables(tmp_path: Path) -> None:
    write(
        tmp_path / "all.toml",
        '[[machine]]\nname = "a"\ncommand = ["true"]\n\n[[machine]]\nname = "b"\nboot = true\n'
        '[[network]]\nname = "n"\nsubnet = "10.9.0.0/24"\n',
    )
    found, problems = collect([tmp_path])
    assert problems == []
    assert [(d.spec.kind, d.spec.name) for d in found] == [
        ("machine", "a"),
        ("machine", "b"),
        ("network", "n"),
    ]


def test_toml_positions_of_nested_fields(tmp_path: Path) -> None:
    write(
        tmp_path / "m.toml",
        '[[machine]]\nname = "a"\ncommand = ["true"]\n\n[[machine]]\nname = "b"\n'
        'script = """\nresources = 1\n"""\nboot = true\n[machine.resources]\nmemory = "12Q"\n',
    )
    _, problems = collect([tmp_path])
    fields = {(p.field, p.line) for p in problems}
    assert ("resources.memory", 12) in fields
    assert ("script", 7) in fields  # unknown field on a machine, at its own line


def test_yaml_positions_point_at_the_key(tmp_path: Path) -> None:
    write(
        tmp_path / "m.yaml",
        "name: a\ncommand: [/bin/true]\nports:\n  - host: 99999\n    machine: 80\n",
    )
    _, problems = collect([tmp_path])
    assert [(p.line, p.column, p.field) for p in problems] == [(4, 5, "ports[0].host")]
    assert problems[0].message == "port 99999 is out of range 1-65535"


def test_all_problems_of_all_files_are_reported(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "name: A\ncommand: [x]\n")
    write(tmp_path / "b.yaml", "name: b\ncommand: [x]\nbogus: 1\nrestart: sometimes\n")
    write(tmp_path / "c.toml", "name = \n")
    _, problems = collect([tmp_path])
    assert {(p.file.name if p.file else "", p.field) for p in problems} == {
        ("a.yaml", "name"),
        ("b.yaml", "bogus"),
        ("b.yaml", "restart"),
        ("c.toml", ""),
    }


def test_alias_bomb_fails_fast(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level in range(1, 30):
        previous = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([previous] * 10)}]")
    write(tmp_path / "bomb.yaml", "\n".join(lines) + "\nname: x\n")
    _, problems = collect([tmp_path])
    assert [p.message for p in problems] == ["aliases are not supported"]


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "deep.yaml", "name: x\nlabels: " + "[" * 200 + "]" * 200 + "\n")
    _, problems = collect([tmp_path])
    assert len(problems) == 1
    assert "nested more than" in problems[0].message


@pytest.mark.parametrize(
    ("name", "text", "where", "message"),
    [
        (
            "deep.toml",
            'kind = "machine"\nname = "x"\nlabels = {a = ' + "[" * 100_000 + "]" * 100_000 + "}\n",
            (3, 46),
            "nested more than 32 levels deep",
        ),
        (
            "deep-tables.toml",
            'kind = "machine"\nname = "x"\nx = ' + "{a = " * 100_000 + "1" + "}" * 100_000 + "\n",
            (3, 5 + 32 * 5),
            "nested more than 32 levels deep",
        ),
        (
            "brackets-in-strings.toml",
            'kind = "machine"\nname = "x"\ncommand = ["'
            + "[" * 100
            + "\", '{{{']\n"
            + "# [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n"
            + "x = "
            + "[" * 40
            + "]" * 40
            + "\n",
            (5, 37),
            "nested more than 32 levels deep",
        ),
        (
            "deep.yaml",
            "name: x\nlabels: " + "[" * 100_000 + "]" * 100_000 + "\n",
            (2, None),
            "",
        ),
        (
            "long.toml",
            'kind = "machine"\nname = "x"\n[resources]\nmemory = -' + "9" * 5000 + "\n",
            (4, 10),
            "a number with more digits than any field takes",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and v.endswith(("toml", "yaml")) else "",
)
def test_hostile_files_give_positioned_errors(
    tmp_path: Path, name: str, text: str, where: tuple[int, int | None], message: str
) -> None:
    write(tmp_path / name, text)
    _, problems = collect([tmp_path])
    assert len(problems) == 1, problems
    (problem,) = problems
    assert problem.line == where[0]
    if where[1] is not None:
        assert problem.column == where[1]
    assert message in problem.message


def test_stop_signals_are_named_one_way_and_default_by_kind() -> None:
    from pymachined.core.spec import Machine

    def machine(**fields: object) -> Machine:
        return Machine.model_validate({"name": "m", "command": ["true"], **fields})

    assert machine().kill_signal == "SIGTERM"
    assert machine(stop_signal="int").kill_signal == "SIGINT"
    assert machine(stop_signal="RTMIN+4").kill_signal == "SIGRTMIN+4"
    booted = Machine.model_validate({"name": "m", "boot": True})
    assert booted.kill_signal == "SIGRTMIN+3"
