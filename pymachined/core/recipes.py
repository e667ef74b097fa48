"""Image recipes in canonical form, the layers they make, and their content keys. Pure.

A key names an image tree by everything that decides its content: the recipe
itself, its parent's key, and the salt the builder adds for the kind of layer
(the bootstrap tool and its version, the mirror, the text of the build
scripts), passed in by the caller.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from pymachined.core.spec import Image, Machine
from pymachined.core.validate import SpecSet
from pymachined.errors import PymachineError

KEY_LENGTH = 16


@dataclass(frozen=True)
class Salts:
    """What the builder adds to a layer's key, by kind of layer."""

    bootstrap: str
    derive: str


@dataclass(frozen=True)
class Layer:
    """One image layer to build or reuse: a base from debootstrap, or a layer on
    top of its parent."""

    key: str
    name: str
    recipe: Image
    parent: str | None
    title: str | None = None  # how people know it, where its name is made up

    @property
    def label(self) -> str:
        """The layer as the operator knows it: a machine's packages layer as its
        image and the packages it adds, any other by its name."""
        return self.title or self.name

    @property
    def is_base(self) -> bool:
        """Whether the layer is bootstrapped rather than derived."""
        return self.recipe.bootstrap is not None


def canonical(image: Image) -> str:
    """The recipe as canonical JSON: sorted keys, no whitespace, no name.

    The name is left out so that two names for the same recipe share one tree."""
    data = image.model_dump(mode="json", by_alias=True, exclude={"name"})
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _key(parent: str | None, image: Image, salt: str) -> str:
    digest = hashlib.sha256()
    for part in (parent or "", canonical(image), salt):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:KEY_LENGTH]


def layers(spec_set: SpecSet, name: str, salts: Salts) -> list[Layer]:
    """The layers of an image, base first."""
    chain: list[Image] = []
    current: str | None = name
    while current is not None:
        image = spec_set.images.get(current)
        if image is None:
            raise PymachineError(f"unknown image {current!r}")
        if image in chain:
            raise PymachineError(f"image {name!r} builds from itself")
        chain.append(image)
        current = image.from_
    out: list[Layer] = []
    parent: str | None = None
    for image in reversed(chain):
        salt = salts.bootstrap if image.bootstrap is not None else salts.derive
        key = _key(parent, image, salt)
        out.append(Layer(key, image.name, image, parent))
        parent = key
    return out


def packages_image(base: str, packages: Sequence[str]) -> Image:
    """The derived image that adds a machine's packages to its image."""
    wanted = sorted(set(packages))
    suffix = hashlib.sha256(" ".join(wanted).encode()).hexdigest()[:8]
    return Image.model_validate(
        {"kind": "image", "name": f"{base[:50]}-pkg-{suffix}", "from": base, "packages": wanted}
    )


def machine_layers(spec_set: SpecSet, machine: Machine, salts: Salts) -> list[Layer]:
    """The layers of a machine's root, base first: its image, and a layer with its
    packages if it declares any."""
    base = layers(spec_set, machine.image, salts)
    if not machine.packages:
        return base
    extra = packages_image(machine.image, machine.packages)
    added = ", ".join(extra.packages)
    title = f"{machine.image} + {added if len(added) <= 60 else added[:57] + '...'}"
    top = Layer(_key(base[-1].key, extra, salts.derive), extra.name, extra, base[-1].key, title)
    return [*base, top]
