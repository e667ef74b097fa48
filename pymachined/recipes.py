"""Image recipes in canonical form, and the content keys derived from them. Pure.

A key names an image tree by everything that decides its content: the recipe
itself, its parent's key, and whatever the builder adds (the bootstrap script's
text, the tool and its version), passed in by the caller.
"""

from __future__ import annotations

import hashlib
import json

from pymachined.errors import PymachineError
from pymachined.spec import Image
from pymachined.validate import SpecSet

KEY_LENGTH = 16


def canonical(image: Image) -> str:
    """The recipe as canonical JSON: sorted keys, no whitespace, no name.

    The name is left out so that two names for the same recipe share one tree."""
    data = image.model_dump(mode="json", by_alias=True, exclude={"name"})
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def image_key(spec_set: SpecSet, name: str, salt: str = "") -> str:
    """The content key of an image: a hash of its recipe, its parent's key and salt."""
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
    key = ""
    for image in reversed(chain):
        digest = hashlib.sha256()
        for part in (key, canonical(image), salt):
            digest.update(part.encode())
            digest.update(b"\0")
        key = digest.hexdigest()[:KEY_LENGTH]
    return key


def image_chain(spec_set: SpecSet, name: str) -> list[str]:
    """The image and its ancestors, nearest first: the overlay's lower layers in order."""
    out: list[str] = []
    current: str | None = name
    while current is not None and current not in out:
        out.append(current)
        current = spec_set.images[current].from_
    return out
