"""Every named preset and the one `generate` that builds a world from any generator's spec."""
from __future__ import annotations

from typing import Union

from models.world.automotive import generate as generate_automotive
from models.world.spec import World, WorldSpec
from models.world.wholesale import WholesaleSpec, generate_wholesale

AUTOMOTIVE_PRESETS = ("tiny", "demo", "full")
WHOLESALE_PRESETS = ("wholesale", "wholesale_tiny")
PRESETS = AUTOMOTIVE_PRESETS + WHOLESALE_PRESETS


def preset(name: str) -> Union[WorldSpec, WholesaleSpec]:
    """The spec of a named preset, automotive or wholesale."""
    if name in WHOLESALE_PRESETS:
        return WholesaleSpec.preset(name)
    if name in AUTOMOTIVE_PRESETS:
        return WorldSpec.preset(name)
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def generate(spec: Union[WorldSpec, WholesaleSpec], seed: int) -> World:
    """Build a world deterministically from (spec, seed), by the spec's generator."""
    if isinstance(spec, WholesaleSpec):
        return generate_wholesale(spec, seed)
    return generate_automotive(spec, seed)
