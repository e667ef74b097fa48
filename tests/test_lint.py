"""Linters as tests: ruff, mypy --strict, and the import-linter contracts that
keep the pure core pure."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = BIN / name
    if found.exists():
        return str(found)
    located = shutil.which(name)
    if located is None:
        pytest.fail(f"{name} is not installed: run scripts/setup")
    return located


@pytest.mark.parametrize(
    "argv",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy", "--strict"],
        ["lint-imports"],
    ],
    ids=["ruff-check", "ruff-format", "mypy", "import-linter"],
)
def test_linter(argv: list[str]) -> None:
    result = subprocess.run(
        [tool(argv[0]), *argv[1:]], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_test_modules_have_distinct_names() -> None:
    # pytest imports test modules by their base name (the test directories are
    # not packages): two of one name stop the whole run at collection.
    seen: dict[str, Path] = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        assert path.name not in seen, f"{path} and {seen[path.name]} share a name"
        seen[path.name] = path


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("plan", "import subprocess"),  # the system, directly
        ("plan", "from pymachined import files"),  # an edge of pymachine's own
        ("render", "from pymachined import execute"),  # one that reaches it all
    ],
)
def test_the_contracts_catch_an_impure_core(tmp_path: Path, module: str, line: str) -> None:
    # A copy of the package with one edge imported into one pure module: the
    # contracts must fail on it, as they pass on the real tree.
    shutil.copytree(REPO / "pymachined", tmp_path / "pymachined", ignore=_caches)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    core = tmp_path / "pymachined" / "core"
    target = (core if core.is_dir() else tmp_path / "pymachined") / f"{module}.py"
    text = target.read_text()
    head, _, body = text.partition("from __future__ import annotations\n")
    target.write_text(f"{head}from __future__ import annotations\n{line}\n{body}")
    result = subprocess.run(
        [tool("lint-imports"), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": str(BIN), "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "The pure core never touches the system BROKEN" in result.stdout, result.stdout


def _caches(directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n == "__pycache__"}


def test_every_module_is_in_exactly_one_layer() -> None:
    import tomllib

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in contracts["contracts"] if c["name"].startswith("Layers:"))
    entries = [name.strip() for layer in layers["layers"] for name in layer.split("|")]
    for path in sorted((REPO / "pymachined").rglob("*.py")):
        if path.name == "__init__.py":
            continue  # a package is its modules
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        covering = [e for e in entries if module == e or module.startswith(f"{e}.")]
        assert len(covering) == 1, f"{module} is in the layers {covering}, not in exactly one"
