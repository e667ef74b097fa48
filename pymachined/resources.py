"""Where pymachine's shipped data lives: templates/ and machines/.

In a wheel they are inside the package; in a source checkout or an editable
install they stand beside it at the top of the repository.
"""

from __future__ import annotations

from pathlib import Path

from pymachined.errors import PymachineError

_HERE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """The directory of shipped data called name ("templates" or "machines")."""
    for candidate in (_HERE / name, _HERE.parent / name):
        if candidate.is_dir():
            return candidate
    raise PymachineError(
        f"pymachine's {name}/ directory is missing from the installation",
        hint="reinstall pymachine",
    )
