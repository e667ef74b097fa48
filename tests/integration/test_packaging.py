"""pymachine works from a wheel: templates/ and machines/ ship inside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            out,
            REPO,
        ],
        check=True,
        capture_output=True,
    )
    (found,) = out.glob("pymachine-*.whl")
    return found


def test_wheel_holds_templates_and_catalog(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in (REPO / "templates").rglob("*.j2"):
        assert f"pymachined/templates/{template.relative_to(REPO / 'templates')}" in names
    for recipe in (REPO / "machines").glob("*.yaml"):
        assert f"pymachined/machines/{recipe.name}" in names
    assert "pymachined/py.typed" in names


def test_render_from_the_wheel(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path)
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from pymachined import cli\n"
        "print(cli.__file__)\n"
        "sys.argv = ['pymachine', 'render', sys.argv[1], 'hello']\n"
        "cli.main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, REPO / "specs"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(str(tmp_path))
    assert "### /etc/systemd/system/pymachine-hello.service" in result.stdout
