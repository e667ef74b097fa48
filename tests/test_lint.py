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
