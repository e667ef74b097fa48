"""Volumes with real nspawn and the default user namespace: data written as
root and as another user keeps its bytes and its owners, as seen inside,
across a root made again, a destroy and apply, and a move out of the user
namespace; an empty volume is seeded from the image once and never again;
volumes outlive destroy and prune, and go only by ``volume rm``; an image
that plants a symlink at a volume's path seeds nothing from the host."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.integration.conftest import Host

pytestmark = pytest.mark.integration

WRITE = (
    "test -e /v/by-root || { echo root > /v/by-root; mkdir /v/u; "
    "head -c 100000 /dev/urandom > /v/u/blob; chown -R 100:102 /v/u; chmod 0640 /v/u/blob; }; "
    "exec sleep infinity"
)

SPECS = """\
kind: volume
name: "@data"
owner: "100:102"
---
kind: volume
name: "@seeded"
---
kind: image
name: "@img"
from: debian-bookworm-slim
files:
  - {path: /srv/seed/hello, content: "@first\\n", mode: "0600"}
  - {path: /etc/marker, content: "@one"}
---
name: "@vm"
image: "@img"
network: none
volumes: ["@data:/v", {name: "@seeded", target: /srv/seed}]
command: [sh, -c, "WRITE"]
""".replace("WRITE", WRITE)


def manifest(host: Host, name: str, path: str) -> list[str]:
    """Each file under path as the machine sees it: path, mode, owner, size, hash."""
    listing = host.pymachine(
        "exec",
        name,
        "--",
        "sh",
        "-c",
        f"cd {path} && find . -printf '%p %m %U:%G %s\\n' | sort && "
        "find . -type f -print0 | sort -z | xargs -0 sha256sum",
    )
    return listing.stdout.splitlines()


def written(host: Host, name: str) -> list[str]:
    """The manifest of /v once the machine's command has written it."""

    def done() -> list[str] | None:
        found = manifest(host, name, "/v")
        return found if any("./u/blob" in line for line in found) else None

    return wait_until(done, "the machine's writes in its volume", 60)


def test_volume_data_keeps_its_bytes_and_owners_and_outlives_its_machine(host: Host) -> None:
    p = host.prefix
    name = f"{p}vm"
    host.declare(SPECS)
    planned = host.pymachine("plan", str(host.specs), check=False).stdout
    assert f"create volume {p}data: new volume" in planned, planned
    host.apply()
    before = written(host, name)
    assert "./by-root 644 0:0 5" in before, before
    assert "./u/blob 640 100:102 100000" in before, before
    assert any(line.startswith("./u 755 100:102 ") for line in before), before
    assert any(line.startswith(". 755 100:102 ") for line in before), before  # its owner
    # Seeded from the image at its first use, owned as in the image.
    seeded = manifest(host, name, "/srv/seed")
    assert "./hello 600 0:0 " + str(len(f"{p}first\n")) in seeded, seeded
    host.pymachine("exec", name, "--", "sh", "-c", "echo mine >> /srv/seed/hello")
    # On disk: the machine's own IDs, whatever its range.
    data = host.root / f"var/lib/pymachine/volumes/{p}data/data"
    assert (data / "u/blob").stat().st_uid == 100
    assert oct((host.root / "var/lib/pymachine/volumes").stat().st_mode & 0o777) == "0o700"

    # A root made again (its image changed), a new seed in the image: the
    # data as it was, the seeded volume not written again.
    changed = SPECS.replace('"@one"', '"@two"').replace('"@first\\n"', '"@second\\n"')
    host.declare(changed)
    host.apply()
    assert written(host, name) == before
    again = host.pymachine("exec", name, "--", "cat", "/srv/seed/hello").stdout
    assert again == f"{p}first\nmine\n", again

    # destroy and apply: a new root, the same data.
    host.pymachine("destroy", "--yes", name)
    docs = {d["name"]: d for d in json.loads(host.pymachine("volume", "ls", "-o", "json").stdout)}
    assert docs[f"{p}data"]["used_by"] == [] and docs[f"{p}data"]["size"] > 100000
    host.apply()
    assert written(host, name) == before

    # Out of the user namespace: the same files, the same owners, in the
    # volume and in the root (which nspawn had shifted to the machine's range).
    own = "echo x > /root/own && mkdir -p /home/u && touch /home/u/f && chown -R 100:102 /home/u"
    host.pymachine("exec", name, "--", "sh", "-c", own)
    owners = ["stat", "-c", "%n %u:%g %A", "/", "/root/own", "/home/u/f", "/usr/bin/su"]
    inside = host.pymachine("exec", name, "--", *owners).stdout
    assert "/home/u/f 100:102 -rw-r--r--" in inside and "/usr/bin/su 0:0 -rwsr-xr-x" in inside
    rootfs = host.root / f"var/lib/pymachine/machines/{name}/rootfs"
    base = rootfs.lstat().st_uid
    assert base >= 65536  # shifted to the machine's range
    acl = ["setfacl", "-m", f"u:{base + 1234}:r", str(rootfs / "root/own")]
    subprocess.run(acl, check=True)  # an ACL naming a user of the machine's range
    host.declare(
        changed.replace("network: none\n", "network: none\nsecurity: {private_users: false}\n")
    )
    host.apply()
    assert written(host, name) == before
    assert host.pymachine("exec", name, "--", *owners).stdout == inside
    assert rootfs.lstat().st_uid == 0
    named = subprocess.run(["getfacl", "-cn", str(rootfs / "root/own")], capture_output=True)
    assert b"user:1234:r--" in named.stdout, named
    # And back into one: nspawn shifts the root again, the owners inside stay.
    host.declare(changed)
    host.apply()
    assert host.pymachine("exec", name, "--", *owners).stdout == inside
    assert written(host, name) == before

    # Removal: refused while used; kept by apply --prune; volume prune takes
    # only what no spec declares and no machine uses, and asks first.
    used = host.pymachine("volume", "rm", "--yes", f"{p}data", check=False)
    assert used.returncode == 1 and f"volume {p}data is used by {name}" in used.stderr
    host.declare(
        'kind: volume\nname: "@kept"\n---\nkind: volume\nname: "@used"\n---\n'
        'name: "@other"\nimage: debian-bookworm-slim\nnetwork: none\n'
        'volumes: ["@used:/u"]\ncommand: [sleep, "1d"]\n'
    )
    pruned = host.apply("--prune").stdout
    assert f"remove {name}" in pruned, pruned
    assert f"{p}data" in host.pymachine("volume", "ls").stdout
    for argv in (("volume", "rm", f"{p}data"), ("volume", "prune", str(host.specs))):
        asked = subprocess.run(
            host.argv(*argv), stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        assert asked.returncode == 1 and "no terminal to ask" in asked.stderr, asked
    assert data.is_dir()
    listed = host.pymachine("volume", "prune", str(host.specs), "--yes").stdout
    assert f"remove volume {p}data" in listed and f"remove volume {p}seeded" in listed, listed
    assert not data.exists()
    left = json.loads(host.pymachine("volume", "ls", "-o", "json").stdout)
    assert sorted((d["name"], d["used_by"]) for d in left) == [
        (f"{p}kept", []),
        (f"{p}used", [f"{p}other"]),
    ]
    again = host.pymachine("volume", "prune", str(host.specs)).stdout
    assert again.startswith("nothing to prune"), again
    host.pymachine("destroy", "--yes", f"{p}other")
    host.pymachine("volume", "rm", "--yes", f"{p}used")
    host.pymachine("volume", "rm", "--yes", f"{p}kept")


def test_a_symlink_at_a_volumes_path_in_the_image_seeds_nothing_from_the_host(host: Host) -> None:
    p = host.prefix
    image = (
        f'kind: image\nname: "{p}bad"\nfrom: debian-bookworm-slim\nscript: ln -s /etc /srv/link\n'
    )
    host.declare(
        image
        + f'---\nkind: volume\nname: "@v"\n---\nname: "@bad"\nimage: "{p}bad"\nnetwork: none\n'
        + 'volumes: ["@v:/srv/link"]\ncommand: [sleep, infinity]\n'
    )
    done = host.apply(check=False)
    assert done.returncode == 1, done
    assert f"machine {p}bad: cannot make /srv/link in its root" in done.stderr, done.stderr
    data = host.root / f"var/lib/pymachine/volumes/{p}v/data"
    assert list(data.iterdir()) == []  # nothing of the host's /etc
    host.pymachine("destroy", "--yes", f"{p}bad", check=False)
    host.pymachine("volume", "rm", "--yes", f"{p}v")


def test_a_bind_with_idmap_shows_the_hosts_owners_inside(host: Host, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "f").write_text("host\n")
    os.chown(shared / "f", 100, 102)
    binds = f'binds: ["{shared}:/plain", {{source: "{shared}", target: /mapped, idmap: true}}]\n'
    host.declare(
        f'name: "@b"\nimage: debian-bookworm-slim\nnetwork: none\n{binds}command: [sleep, "1d"]\n'
    )
    host.apply()
    host.payload("b")
    shown = host.pymachine(
        "exec", f"{host.prefix}b", "--", "stat", "-c", "%u:%g", "/plain/f", "/mapped/f"
    )
    # Without idmap the host's 100 is outside the machine's range: nobody.
    assert shown.stdout.split() == ["65534:65534", "100:102"]
    host.pymachine("exec", f"{host.prefix}b", "--", "touch", "/mapped/made")
    assert ((shared / "made").stat().st_uid, (shared / "made").stat().st_gid) == (0, 0)


def tree_manifest(root: Path) -> list[tuple[object, ...]]:
    """Every entry under root, as stored: path, type and mode, owner, size,
    blocks used (holes), hash, xattrs (POSIX ACLs among them) and which
    entries are one file (hard links)."""
    out: list[tuple[object, ...]] = []
    inodes: dict[int, str] = {}
    for entry in sorted([root, *root.rglob("*")]):
        info = entry.lstat()
        where = str(entry.relative_to(root))
        digest = hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() else None
        if entry.is_symlink():
            digest = os.readlink(entry)
            xattrs: dict[str, bytes] = {}
        else:
            xattrs = {k: os.getxattr(entry, k) for k in sorted(os.listxattr(entry))}
        first = inodes.setdefault(info.st_ino, where) if info.st_nlink > 1 else where
        out.append(
            (where, info.st_mode, info.st_uid, info.st_gid, info.st_size, info.st_blocks > 0,
             digest, xattrs, first)
        )  # fmt: skip
    return out


def test_an_exported_volume_imports_into_a_new_one_whole(host: Host, tmp_path: Path) -> None:
    p = host.prefix
    host.declare(SPECS)
    host.apply()
    before = written(host, f"{p}vm")
    volumes = host.root / "var/lib/pymachine/volumes"
    data = volumes / f"{p}data/data"
    # What a machine's tools can leave: an xattr, an ACL, a hard link, a hole.
    os.setxattr(data / "by-root", "user.origin", b"test")
    subprocess.run(["setfacl", "-m", "u:1234:r,g:77:rw", str(data / "u/blob")], check=True)
    os.link(data / "u/blob", data / "u/again")
    with (data / "sparse").open("wb") as sparse:
        sparse.truncate(64 << 20)
        sparse.write(b"head")
    archive = tmp_path / "data.tar"
    host.pymachine("volume", "export", f"{p}data", str(archive))
    assert not list(tmp_path.glob(".data.tar.partial-*"))

    # Into a volume no spec declares yet: import makes it; then a spec uses it.
    copy = volumes / f"{p}copy/data"
    host.pymachine("volume", "import", f"{p}copy", str(archive))
    assert tree_manifest(copy) == tree_manifest(data)
    assert (copy / "sparse").stat().st_blocks * 512 < 1 << 20  # the hole stayed a hole
    acl = subprocess.run(["getfacl", "-cn", str(copy / "u/blob")], capture_output=True, text=True)
    assert "user:1234:r--" in acl.stdout and "group:77:rw-" in acl.stdout, acl
    host.declare(
        SPECS
        + f'---\nkind: volume\nname: "@copy"\n---\nname: "@vm2"\nimage: "{p}img"\n'
        + 'network: none\nvolumes: ["@copy:/v"]\ncommand: [sleep, infinity]\n'
    )
    host.apply()
    host.payload("vm2")
    # As its machines see it, the same files, the same owners.
    seen = [line for line in manifest(host, f"{p}vm2", "/v") if "sparse" not in line]
    assert seen == [line for line in manifest(host, f"{p}vm", "/v") if "sparse" not in line]
    assert "./u/again 660 100:102 100000" in seen, seen  # the ACL's mask is the group's bits
    assert {line for line in before if "blob" not in line} <= set(seen), before

    # Never while a running machine uses it; never over data.
    busy = host.pymachine("volume", "import", f"{p}copy", str(archive), check=False)
    assert busy.returncode == 1, busy
    assert f"volume {p}copy is used by running machines: {p}vm2" in busy.stderr, busy.stderr
    host.pymachine("stop", f"{p}vm2")
    full = host.pymachine("volume", "import", f"{p}copy", str(archive), check=False)
    assert full.returncode == 1 and f"volume {p}copy holds data" in full.stderr, full.stderr

    # A hostile archive: members that climb out, absolute paths, a symlink
    # then a file through it, a hard link to a host file. Nothing lands
    # outside, the volume stays empty, and nothing half-made is left.
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = tmp_path / "evil.tar"
    members = [
        ("ok", tarfile.REGTYPE, ""),
        ("out", tarfile.SYMTYPE, str(outside)),
        ("out/planted", tarfile.REGTYPE, ""),
        ("../climbed", tarfile.REGTYPE, ""),
        (f"{outside}/absolute", tarfile.REGTYPE, ""),
        ("up", tarfile.SYMTYPE, "../../../../../../.."),
        (f"up{outside}/through", tarfile.REGTYPE, ""),
        ("shadow", tarfile.LNKTYPE, "/etc/shadow"),
    ]
    with tarfile.open(evil, "w") as tar:
        for name, kind, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, 0 if link else 5
            tar.addfile(info, None if link else io.BytesIO(b"owned"))
    bad = host.pymachine("volume", "import", f"{p}evil", str(evil), check=False)
    assert bad.returncode == 1, bad
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "climbed").exists()
    assert list((volumes / f"{p}evil/data").iterdir()) == []
    assert not (volumes / f"{p}evil/data.importing").exists()
    # A second try with a whole archive then works: the failed one left nothing.
    piped = subprocess.run(
        host.argv("volume", "import", f"{p}evil", "-"), input=archive.read_bytes(), check=False
    )
    assert piped.returncode == 0
    assert tree_manifest(volumes / f"{p}evil/data") == tree_manifest(data)
    for name in ("vm", "vm2"):
        host.pymachine("destroy", "--yes", f"{p}{name}")
    for name in ("data", "seeded", "copy", "evil"):
        host.pymachine("volume", "rm", "--yes", f"{p}{name}")


def test_an_idmap_bind_on_a_filesystem_that_cannot_map_is_refused_with_why(
    host: Host, tmp_path: Path
) -> None:
    # ramfs has no ID-mapped mounts: nspawn would fail at the start unexplained.
    ramfs = tmp_path / "ramfs"
    ramfs.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(ramfs)], check=True)
    try:
        spec = (
            'name: "@s"\nimage: debian-bookworm-slim\nnetwork: none\n'
            f"binds: [{{source: {ramfs}, target: /r, idmap: true}}]\n"
            "command: [sleep, infinity]\n"
        )
        host.declare(spec)
        done = host.apply(check=False)
        assert done.returncode == 1, done
        assert (
            f"machine {host.prefix}s: bind {ramfs} cannot be mounted ID-mapped on its "
            "filesystem (Invalid argument)" in done.stderr
        ), done.stderr
        assert "security.private_users: false" in done.stderr
        assert host.machines().get(f"{host.prefix}s", {}).get("state") != "running"
        # Without a user namespace there is nothing to map: the same bind starts.
        host.declare(
            spec.replace("network: none\n", "network: none\nsecurity: {private_users: false}\n")
        )
        host.apply()
        host.payload("s")
        host.pymachine("destroy", "--yes", f"{host.prefix}s")
    finally:
        subprocess.run(["umount", "--lazy", str(ramfs)], check=False)
