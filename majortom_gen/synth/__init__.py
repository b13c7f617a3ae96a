"""A format-true synthetic Major TOM world: procedural, physically linked modalities
written in the exact Core layout (see :mod:`majortom_gen.synth.world`)."""

from majortom_gen.synth.world import SynthOptions, write_world

__all__ = ["SynthOptions", "write_world"]
