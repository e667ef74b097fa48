"""``image build``, and the spec sets commands load: images built for a name
or for every image and machine a spec path declares. Edge."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from pymachined.core.layout import Layout
from pymachined.core.recipes import layers, machine_layers
from pymachined.core.validate import SpecSet, load_set
from pymachined.errors import PymachineError
from pymachined.images import ImageRecord, ImageStore
from pymachined.resources import data_dir


def spec_set(layout: Layout, paths: Sequence[Path]) -> SpecSet:
    """The specs of paths, validated, with pymachine's own state directories
    (and the root's, under --root) out of every bind's reach."""
    state_dirs = [PurePosixPath("/var/lib/pymachine"), PurePosixPath("/run/pymachine")]
    if layout.root != PurePosixPath("/"):
        state_dirs += [layout.state_dir, layout.run_dir]
    return load_set(list(paths), data_dir("machines"), state_dirs)


def build(
    layout: Layout, store: ImageStore, target: str, specs: Sequence[Path]
) -> Iterator[ImageRecord]:
    """Build target, an image name declared in specs, or, if it is a spec file
    or directory, every image and machine it declares; each plan's top layer
    once it is built."""
    salts = store.salts()
    path = Path(target)
    if path.exists():
        found = spec_set(layout, [path, *specs])
        declared = sorted(name for kind, name in found.sources if kind == "image")
        plans = [layers(found, name, salts) for name in declared]
        plans += [machine_layers(found, m, salts) for m in found.machines.values()]
        if not plans:
            raise PymachineError(f"{target} declares no images or machines")
    else:
        found = spec_set(layout, specs)
        if target not in found.images:
            known = ", ".join(sorted(found.images))
            raise PymachineError(f"unknown image {target!r}", hint=f"images: {known}")
        plans = [layers(found, target, salts)]
    for plan in plans:
        yield store.ensure(plan)[0]
