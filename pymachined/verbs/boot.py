"""``install`` and ``uninstall``: pymachine-apply.service (and its .path unit
with --watch), which applies a spec directory at boot. Edge."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from pymachined import files, run
from pymachined.core import commands
from pymachined.core.layout import Layout
from pymachined.core.render import APPLY_PATH_UNIT, APPLY_UNIT, apply_unit_files
from pymachined.execute import remove_owned_file
from pymachined.reconcile import choose_supervisor, program
from pymachined.resources import data_dir


def systemd_host(layout: Layout) -> None:
    """Refuse unless systemd is PID 1 and the root is /."""
    choose_supervisor(layout, "systemd")


def install(layout: Layout, spec_dir: Path, watch: bool) -> list[str]:
    """Write and enable the boot apply's units for spec_dir (starting the .path
    unit with watch, removing one left from an earlier install without it);
    the units enabled."""
    systemd_host(layout)
    rendered = apply_unit_files(
        PurePosixPath(spec_dir), layout, data_dir("templates"), program(), watch=watch
    )
    for file in rendered:
        files.atomic_write(Path(file.path), file.content, file.mode)
    stale = Path(layout.unit_dir) / APPLY_PATH_UNIT
    units = [APPLY_UNIT, APPLY_PATH_UNIT] if watch else [APPLY_UNIT]
    if not watch and stale.exists():
        run.run(commands.systemctl_argv("disable", [APPLY_PATH_UNIT], "--no-reload", "--now"))
        remove_owned_file(stale)
    run.run(commands.systemctl_argv("enable", units, "--no-reload"))
    run.run(commands.daemon_reload_argv())
    if watch:
        run.run(commands.systemctl_argv("start", [APPLY_PATH_UNIT]))
    return units


def uninstall(layout: Layout) -> list[str]:
    """Disable and remove the boot apply's units; those that were installed."""
    systemd_host(layout)
    present = [u for u in (APPLY_PATH_UNIT, APPLY_UNIT) if (Path(layout.unit_dir) / u).exists()]
    if not present:
        return []
    run.run(commands.systemctl_argv("disable", present, "--no-reload", "--now"))
    for unit in present:
        remove_owned_file(Path(layout.unit_dir) / unit)
    run.run(commands.daemon_reload_argv())
    return present
