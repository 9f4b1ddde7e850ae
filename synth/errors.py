"""The error a synthesis run stops with; its own module so the run and its Ray side (``synth.distribute``) share
it without importing each other."""

from __future__ import annotations


class SynthError(RuntimeError):
    """The run cannot go on; the message says why and what to do. Finished shards stay valid for a rerun."""
