"""Images and machine roots, with real debootstrap, overlayfs and mounts (as root)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from pymachined import files, rootfs
from pymachined.core.layout import Layout
from pymachined.core.recipes import layers, machine_layers
from pymachined.core.spec import RootfsMode
from pymachined.core.validate import SpecSet, load_set
from pymachined.images import ImageRecord, ImageStore, Progress
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def pymachine(root: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, against a state root."""
    return subprocess.run(
        [sys.executable, "-m", "pymachined", "--root", str(root), *args],
        capture_output=True,
        text=True,
        check=check,
    )


def mounted_under(path: Path) -> list[str]:
    """Mount points at or below path, from /proc/self/mountinfo."""
    text = Path("/proc/self/mountinfo").read_text()
    points = [line.split()[4] for line in text.splitlines()]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


def snapshot(tree: Path) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime) of every entry below tree, to prove it unchanged."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            info = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return out


def specs(tmp_path: Path, text: str) -> SpecSet:
    spec = tmp_path / "specs.yaml"
    spec.write_text(text)
    return load_set([spec], REPO / "machines")


# ---------------------------------------------------------------------------
# Building and caching


def test_slim_image_is_built_complete_and_clean(
    slim_image: ImageRecord, cache_store: ImageStore
) -> None:
    tree = slim_image.tree
    assert (tree / "usr/bin/env").is_file()
    assert (tree / "etc/machine-id").read_text() == ""
    assert not (tree / "etc/hostname").exists()
    assert list((tree / "var/lib/apt/lists").glob("*_Packages")) == []
    assert slim_image.tool.startswith(("mmdebstrap ", "debootstrap "))
    assert slim_image.mirror and slim_image.mirror.startswith(("http://", "https://"))
    assert not (slim_image.path / "build").exists()
    assert list(cache_store.root.glob(".staging-*")) == []
    assert slim_image.key in {r.key for r in cache_store.records()}


def test_second_build_is_a_cache_hit(
    slim_image: ImageRecord, cache_store: ImageStore, cache_layout: Layout
) -> None:
    log = cache_store.log_path(slim_image.key)
    before = (log.stat().st_mtime_ns, (slim_image.path / "image.json").read_text())
    result = pymachine(Path(cache_layout.root), "image", "build", "debian-bookworm-slim")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["debian-bookworm-slim", slim_image.key]
    assert (log.stat().st_mtime_ns, (slim_image.path / "image.json").read_text()) == before
    assert "built" not in result.stderr  # no build ran


def test_packages_make_a_derived_layer_and_leave_the_base_alone(
    tmp_path: Path, slim_image: ImageRecord, cache_store: ImageStore
) -> None:
    spec_set = specs(
        tmp_path, "name: curly\nimage: debian-bookworm-slim\npackages: [curl]\ncommand: [curl]\n"
    )
    base_before = snapshot(slim_image.tree)
    plan = machine_layers(spec_set, spec_set.machines["curly"], cache_store.salts())
    chain = cache_store.ensure(plan)
    assert [r.key for r in chain] == [plan[1].key, slim_image.key]
    top = chain[0]
    assert (top.tree / "usr/bin/curl").is_file()
    assert not (slim_image.tree / "usr/bin/curl").exists()
    assert top.parent == slim_image.key
    assert snapshot(slim_image.tree) == base_before


def test_concurrent_builds_of_one_image_wait_for_the_first(
    tmp_path: Path, slim_image: ImageRecord, cache_layout: Layout
) -> None:
    marker = uuid.uuid4().hex
    spec = tmp_path / "image.yaml"
    spec.write_text(
        "kind: image\nname: slow\nfrom: debian-bookworm-slim\n"
        f"script: 'sleep 3; echo {marker} >> /built-by'\n"
    )
    argv = [sys.executable, "-m", "pymachined", "--root", str(cache_layout.root)]
    first, second = (
        subprocess.Popen(
            [*argv, "image", "build", str(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    )
    outs = [p.communicate(timeout=300) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    keys = {out.split()[1] for out, _ in outs}
    assert len(keys) == 1
    store = ImageStore(cache_layout, REPO / "templates")
    (key,) = keys
    assert (store.path(key) / "rootfs/built-by").read_text() == f"{marker}\n"  # built once
    assert any("waiting for" in err for _, err in outs)
    store.remove(key)


# ---------------------------------------------------------------------------
# Failures


@pytest.mark.parametrize(
    ("bootstrap", "expected"),
    [
        ("{suite: nosuchsuite}", "nosuchsuite"),
        ("{suite: bookworm, mirror: 'http://127.0.0.1:9/debian'}", "127.0.0.1:9"),
    ],
    ids=["unknown-suite", "dead-mirror"],
)
def test_a_failed_build_leaves_nothing(tmp_path: Path, bootstrap: str, expected: str) -> None:
    root = tmp_path / "host"
    spec = tmp_path / "image.yaml"
    spec.write_text(f"kind: image\nname: broken\nbootstrap: {bootstrap}\n")
    result = pymachine(root, "image", "build", str(spec))
    assert result.returncode == 1
    assert "error: building image broken failed" in result.stderr
    assert expected in result.stderr
    assert "hint: the full log is" in result.stderr
    assert "Traceback" not in result.stderr
    images = root / "var/lib/pymachine/images"
    assert [p.name for p in images.iterdir() if not p.name.startswith(".")] == []
    assert list(images.glob(".staging-*")) == []
    assert mounted_under(root) == []
    assert pymachine(root, "image", "ls", "-o", "json").stdout.strip() == "[]"


def test_sigkill_mid_debootstrap_then_build_again(tmp_path: Path, catalog: SpecSet) -> None:
    root = tmp_path / "host"
    argv = [sys.executable, "-m", "pymachined", "--root", str(root)]
    build = subprocess.Popen(
        [*argv, "image", "build", "debian-bookworm-slim"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    logs = root / "var/lib/pymachine/images/.logs"

    def going() -> bool:
        text = "".join(p.read_text() for p in logs.glob("*.log")) if logs.is_dir() else ""
        # Both tools are at work on the target by the time they download.
        if any(word in text for word in ("I: Retrieving", "I: downloading", "I: Extracting")):
            return True
        assert build.poll() is None, "the build ended before it could be killed"
        return False

    wait_until(going, "debootstrap to get going", 300)
    build.send_signal(signal.SIGKILL)  # pymachine alone: its children must follow
    build.wait()
    images = root / "var/lib/pymachine/images"
    wait_until(
        lambda: not _debootstrap_running(images), "the bootstrap tool to end with pymachine", 30
    )
    assert mounted_under(root) == []
    store = ImageStore(Layout(PurePosixPath(root)), REPO / "templates", Progress())
    assert store.records() == []
    assert list(images.glob(".staging-*")) != []  # left behind, but never listed
    chain = store.ensure(layers(catalog, "debian-bookworm-slim", store.salts()))
    assert (chain[0].tree / "usr/bin/env").is_file()
    assert list(images.glob(".staging-*")) == []


def _debootstrap_running(images: Path) -> bool:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(images) in cmdline and ("debootstrap" in cmdline or "mmdebstrap" in cmdline):
            return True
    return False


# ---------------------------------------------------------------------------
# Machine roots


@pytest.fixture
def machine_names(cache_layout: Layout) -> Iterator[list[str]]:
    """Unique machine names, whose roots are removed after the test."""
    names = [f"pmt-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    yield names
    for name in names:
        rootfs.remove(cache_layout, name)


def test_overlay_machines_do_not_see_each_other(
    slim_image: ImageRecord,
    cache_store: ImageStore,
    cache_layout: Layout,
    machine_names: list[str],
) -> None:
    chain = cache_store.chain(slim_image.key)
    image_before = snapshot(slim_image.tree)
    one, two = (
        rootfs.mount(
            cache_layout, cache_store, rootfs.create(cache_layout, n, RootfsMode.OVERLAY, chain)
        )
        for n in machine_names
    )
    (one / "written-in-one").write_text("one\n")
    (one / "etc/debian_version").unlink()
    assert not (two / "written-in-one").exists()
    assert not (slim_image.tree / "written-in-one").exists()
    assert (two / "etc/debian_version").is_file()
    assert (slim_image.tree / "etc/debian_version").is_file()
    whiteout = os.lstat(
        Path(cache_layout.machine_dir(machine_names[0])) / "upper/etc/debian_version"
    )
    assert os.major(whiteout.st_rdev) == 0 and os.minor(whiteout.st_rdev) == 0  # a whiteout
    assert snapshot(slim_image.tree) == image_before
    assert rootfs.users(cache_layout)[slim_image.key] == sorted(machine_names)


def test_copy_and_ephemeral_roots(
    slim_image: ImageRecord,
    cache_store: ImageStore,
    cache_layout: Layout,
    machine_names: list[str],
) -> None:
    chain = cache_store.chain(slim_image.key)
    copy = rootfs.mount(
        cache_layout,
        cache_store,
        rootfs.create(cache_layout, machine_names[0], RootfsMode.COPY, chain),
    )
    # A copy is its own tree, bound onto itself only to be nodev.
    assert mounted_under(copy) == [str(copy)]
    (copy / "etc/debian_version").unlink()
    assert (slim_image.tree / "etc/debian_version").is_file()

    root = rootfs.create(cache_layout, machine_names[1], RootfsMode.EPHEMERAL, chain)
    ephemeral = rootfs.mount(cache_layout, cache_store, root)
    (ephemeral / "scratch").write_text("gone at stop\n")
    rootfs.unmount(cache_layout, machine_names[1])
    assert mounted_under(Path(cache_layout.machine_dir(machine_names[1]))) == []
    again = rootfs.mount(cache_layout, cache_store, root)
    assert not (again / "scratch").exists()
    assert (again / "etc/debian_version").is_file()
    rootfs.remove(cache_layout, machine_names[0])
    assert mounted_under(copy) == []


def test_removing_a_root_spares_a_bind_mounted_host_directory(
    tmp_path: Path,
    slim_image: ImageRecord,
    cache_store: ImageStore,
    cache_layout: Layout,
    machine_names: list[str],
) -> None:
    host = tmp_path / "precious"
    host.mkdir()
    (host / "data").write_text("keep me\n")
    name = machine_names[0]
    root = rootfs.create(cache_layout, name, RootfsMode.OVERLAY, cache_store.chain(slim_image.key))
    merged = rootfs.mount(cache_layout, cache_store, root)
    (merged / "mnt/host").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(host), str(merged / "mnt/host")], check=True)
    rootfs.remove(cache_layout, name)
    assert (host / "data").read_text() == "keep me\n"
    base = Path(cache_layout.machine_dir(name))
    assert rootfs.read(cache_layout, name) is None
    assert sorted(p.name for p in base.iterdir()) == [rootfs.OWNER]  # the machine's, for now
    assert mounted_under(base) == []
    files.remove_tree(base)


# ---------------------------------------------------------------------------
# The image commands


def test_image_ls_rm_prune_and_df(
    tmp_path: Path, slim_image: ImageRecord, cache_store: ImageStore
) -> None:
    import json

    root = tmp_path / "host"
    layout = Layout(PurePosixPath(root))
    images = Path(layout.images_dir)
    images.mkdir(parents=True)
    # This host's cache holds a copy of the slim image, so nothing here touches
    # the shared test cache.
    subprocess.run(["cp", "-a", "--reflink=auto", str(slim_image.path), str(images)], check=True)
    store = ImageStore(layout, REPO / "templates", Progress())
    rootfs.create(layout, "user", RootfsMode.OVERLAY, store.chain(slim_image.key))

    listed = json.loads(pymachine(root, "image", "ls", "-o", "json", check=True).stdout)
    assert [(i["name"], i["key"], i["used_by"]) for i in listed] == [
        ("debian-bookworm-slim", slim_image.key, ["user"])
    ]
    assert listed[0]["size"] > 50 * 1024 * 1024

    refused = pymachine(root, "image", "rm", "debian-bookworm-slim")
    assert refused.returncode == 1
    assert f"error: image {slim_image.key} is used by user" in refused.stderr
    kept = pymachine(root, "image", "prune", "--yes", check=True)
    assert kept.stdout == "no unused images\n"

    usage = json.loads(pymachine(root, "df", "-o", "json", check=True).stdout)
    assert {(u["type"], u["name"]) for u in usage} == {
        ("image", "debian-bookworm-slim"),
        ("machine", "user"),
    }

    rootfs.remove(layout, "user")
    asked = pymachine(root, "image", "prune")  # no terminal and no --yes: lists, removes nothing
    assert asked.returncode == 1
    assert f"unused: debian-bookworm-slim {slim_image.key}" in asked.stdout
    assert "add --yes" in asked.stderr
    assert store.get(slim_image.key) is not None
    pruned = pymachine(root, "image", "prune", "--yes", check=True)
    assert f"removed {slim_image.key}" in pruned.stdout
    assert store.records() == []
    assert [p.name for p in images.iterdir() if not p.name.startswith(".")] == []


def test_prune_removes_stopped_undeclared_machines_and_unused_images(
    tmp_path: Path, slim_image: ImageRecord
) -> None:
    import json

    import yaml

    root = tmp_path / "host"
    images = root / "var/lib/pymachine/images"
    images.mkdir(parents=True)
    # A private copy of the slim image: prune must not touch the shared cache.
    subprocess.run(["cp", "-a", "--reflink=auto", str(slim_image.path), str(images)], check=True)
    prefix = f"p{uuid.uuid4().hex[:6]}-"
    specs = tmp_path / "specs"
    specs.mkdir()
    keep = (
        f"name: {prefix}keep\nimage: debian-bookworm-slim\ncommand: [sleep, infinity]\n"
        "network: none\n"
    )
    (specs / "m.yaml").write_text(keep + "---\n" + keep.replace("keep", "old") + "state: stopped\n")
    try:
        pymachine(root, "apply", str(specs), "--yes", check=True)
        as_json = json.loads(pymachine(root, "ls", "-o", "json", check=True).stdout)
        as_yaml = yaml.safe_load(pymachine(root, "ls", "-o", "yaml", check=True).stdout)
        for row in [*as_json, *as_yaml]:
            row.pop("uptime")  # the same rows both ways, but a second may pass between the two
        assert as_yaml == as_json
        (specs / "m.yaml").write_text(keep)
        empty = tmp_path / "empty"
        empty.mkdir()
        assert pymachine(root, "prune", str(empty), "--yes").returncode == 1
        listed = pymachine(root, "prune", str(specs))  # no terminal, no --yes: only a list
        assert listed.returncode == 1
        assert f"stopped, undeclared machine: {prefix}old" in listed.stdout
        pruned = pymachine(root, "prune", str(specs), "--yes", check=True)
        assert f"removed machine {prefix}old" in pruned.stdout
        names = [r["name"] for r in json.loads(pymachine(root, "ls", "-o", "json").stdout)]
        assert names == [f"{prefix}keep"]
        assert ImageStore(Layout(PurePosixPath(root)), REPO / "templates").get(slim_image.key)
    finally:
        pymachine(root, "destroy", "--yes", f"{prefix}keep")
        pymachine(root, "destroy", "--yes", f"{prefix}old")
        lock = root / "run/pymachine/pymachined.lock"
        if lock.exists() and lock.read_text().strip():
            os.kill(int(lock.read_text().split()[1]), signal.SIGTERM)
