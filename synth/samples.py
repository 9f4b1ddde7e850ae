"""One decoder for a sample of any shard, and the prior members a sample may carry.

Synth shards (:mod:`synth.read`) and tier shards (:mod:`synth.tiers`) may both carry precomputed priors, written
by the priors stage as ``KEY.prior.<name>.npy`` members (name in ``[a-z0-9_]``, a numeric array saved without
pickle). :func:`decode` splits those off, decodes the rest as whichever format it is, and returns the priors as
``sample["priors"]`` (float32, maybe empty). :func:`with_priors` and :func:`raw_members` are the writing side:
a raw sample with priors added, back to the sorted tar members every shard writer uses.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np

from synth.read import ShardFormatError, decode_member, decode_sample
from synth.tiers import decode_tier_sample, is_tier_sample

PRIOR_MEMBER = re.compile(r"prior\.([a-z0-9_]+)\.npy")


def encode_prior(value: np.ndarray) -> bytes:
    """A prior as NPY bytes, saved without pickle."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
    return buf.getvalue()


def with_priors(raw: dict[str, Any], priors: dict[str, np.ndarray]) -> dict[str, Any]:
    """``raw`` (a raw sample: member suffix -> bytes) with a ``prior.<name>.npy`` member per prior added."""
    bad = [name for name in priors if PRIOR_MEMBER.fullmatch(f"prior.{name}.npy") is None]
    if bad:
        raise ValueError(f"prior names must match [a-z0-9_]+, got {bad}")
    return {**raw, **{f"prior.{name}.npy": encode_prior(value) for name, value in priors.items()}}


def raw_members(raw: dict[str, Any]) -> list[tuple[str, bytes]]:
    """A raw sample's tar members ``KEY.<suffix>``, sorted by suffix (``__``-prefixed fields left out)."""
    key = raw["__key__"]
    return [(f"{key}.{suffix}", raw[suffix]) for suffix in sorted(raw) if not suffix.startswith("__")]


def split_priors(raw: dict[str, Any], origin: str = "?") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(priors, rest)``: the ``prior.<name>.npy`` members of a raw sample loaded (float32, never unpickled), and
    its other members; a ``prior.`` member of another form is a ShardFormatError naming the shard and sample."""
    priors, rest, key = {}, {}, raw.get("__key__", "?")
    for name, data in raw.items():
        if not name.startswith("prior."):
            rest[name] = data
            continue
        match = PRIOR_MEMBER.fullmatch(name)
        if match is None:
            raise ShardFormatError(f"shard {origin}: sample {key}, member {name!r} is not a prior.<name>.npy array")
        priors[match.group(1)] = decode_member(name, data, origin, key).astype(np.float32)
    return priors, rest


def decode(raw: dict[str, Any], origin: str = "?") -> dict[str, Any]:
    """Decode a raw sample of either format; precomputed priors go to ``sample["priors"]`` (maybe empty)."""
    priors, rest = split_priors(raw, origin)
    sample = decode_tier_sample(rest, origin) if is_tier_sample(rest) else decode_sample(rest, origin)
    sample["priors"] = priors
    return sample


def degraded(raw: dict[str, Any], origin: str = "?") -> np.ndarray:
    """The stored degraded image of a raw sample of either format (``lq``, a tier sample's low tier); a sample
    without one (an on-the-fly synth sample) is a ShardFormatError."""
    sample = decode(raw, origin)
    if "lq" not in sample:
        raise ShardFormatError(f"shard {origin}: sample {sample['key']} stores no degraded image (lq.png or low.png)")
    return sample["lq"]
