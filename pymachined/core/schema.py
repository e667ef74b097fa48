"""The JSON Schema of spec documents, for editors and CI. Pure."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from pymachined.core.spec import Image, Machine, Network, Volume


def json_schema() -> dict[str, Any]:
    """A schema accepting one declaration of any kind (a YAML document or TOML table)."""
    _, top = models_json_schema(
        [(m, "validation") for m in (Machine, Network, Image, Volume)],
        ref_template="#/$defs/{model}",
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "pymachine spec",
        "description": "One declaration: kind machine (the default), network, image or volume.",
        "anyOf": [{"$ref": f"#/$defs/{m.__name__}"} for m in (Machine, Network, Image, Volume)],
        "$defs": top["$defs"],
    }
