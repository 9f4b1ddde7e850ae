"""Tier shards: low (the degraded input), medium (a held-out restoration) and high (the ground truth).

Written by cross-validation for prompt learning and the difficulty-adaptive loss, with the same guarantees as
synthesis shards: deterministic members, published all-or-nothing (``synth.writer.publish_tar``), only PNG and
JSON inside.
Members per sample: ``KEY.high.png``, ``KEY.json``, ``KEY.low.png``, ``KEY.medium.png``.

The tier manifest (``manifest.json`` beside the shards) lists them; format version 2 adds each shard's ``split``
(``train`` for cross-validated folds, ``val``/``test`` for held-out restorations) and a ``heldout`` summary. A
version-1 manifest has training shards only. Every version lists each shard's sha256, which readers check
(:func:`tier_shard_paths`).
"""

from __future__ import annotations

import json

import numpy as np

from synth import storage
from synth.imageio import encode_png
from synth.read import ShardURL, manifest_urls

TIER_FORMAT = "clearair-tiers"
TIER_VERSION = 2


def shard_split(entry: dict) -> str:
    """The split of a tier-manifest shard entry (``train`` in version-1 manifests, which have no other)."""
    return entry.get("split", "train")


def tier_shard_paths(root: str, heldout: bool = False) -> list[ShardURL]:
    """The non-empty training shards of the tier set at ``root`` (the held-out val/test ones with ``heldout``) as
    :class:`synth.read.ShardURL` locations carrying the sha256 the tier manifest lists."""
    path = storage.join(root, "manifest.json")
    entries = [s for s in storage.read_json(path)["shards"] if s["samples"]]
    return manifest_urls(path, root, [s for s in entries if (shard_split(s) != "train") == heldout])


def tier_members(key: str, low: np.ndarray, medium: np.ndarray, high: np.ndarray, meta: dict, level: int = 1):
    return [
        (f"{key}.high.png", encode_png(high, level)),
        (f"{key}.json", json.dumps(meta, sort_keys=True).encode()),
        (f"{key}.low.png", encode_png(low, level)),
        (f"{key}.medium.png", encode_png(medium, level)),
    ]
