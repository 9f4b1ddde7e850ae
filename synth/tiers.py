"""Tier shards: low (the degraded input), medium (a held-out restoration) and high (the ground truth).

The one home of the format: written (:func:`write_tier_shard`), named (:func:`tier_shard_name`), listed in a
manifest (:func:`tier_manifest`) and decoded (:func:`decode_tier_sample`) here; cross-validation writes them, the
perceiver, the priors stage and ``clearair.data`` read them. The same guarantees as synthesis shards:
deterministic members, published all-or-nothing (``synth.writer.publish_tar``), only PNG and JSON inside.
Members per sample: ``KEY.high.png``, ``KEY.json``, ``KEY.low.png``, ``KEY.medium.png``. The json holds the
sample's ``key``, ``task``, ``fold``, ``source_shard``, the ``psnr``/``ssim`` of the low and medium tiers and,
for synthetic samples, the provenance fresh noise needs (``origin``, ``seed``, ``variant``, ``degradations``).
Decoded samples use the synth names: ``lq`` = low, ``gt`` = high, plus ``medium``.

The tier manifest (``manifest.json`` beside the shards) lists them; format version 2 adds each shard's ``split``
(``train`` for cross-validated folds, ``val``/``test`` for held-out restorations) and a ``heldout`` summary. A
version-1 manifest has training shards only. Every version lists each shard's sha256, which readers check
(:func:`tier_shard_paths`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from synth import storage
from synth.imageio import encode_png
from synth.read import ShardFormatError, ShardURL, decode_member, manifest_urls
from synth.writer import publish_tar

TIER_FORMAT = "clearair-tiers"
TIER_VERSION = 2
TIERS = ("low", "medium", "high")  # the perceiver's labels 0, 1, 2 (clearair.models.perceiver.TIERS)
TIER_MEMBERS = ("low.png", "medium.png", "high.png", "json")
PROVENANCE = ("origin", "seed", "variant", "degradations")  # synth metadata a tier sample keeps (fresh noise)


def shard_split(entry: dict) -> str:
    """The split of a tier-manifest shard entry (``train`` in version-1 manifests, which have no other)."""
    return entry.get("split", "train")


def tier_shard_paths(root: str, heldout: bool = False) -> list[ShardURL]:
    """The non-empty training shards of the tier set at ``root`` (the held-out val/test ones with ``heldout``) as
    :class:`synth.read.ShardURL` locations carrying the sha256 the tier manifest lists."""
    path = storage.join(root, "manifest.json")
    entries = [s for s in storage.read_json(path)["shards"] if s["samples"]]
    return manifest_urls(path, root, [s for s in entries if (shard_split(s) != "train") == heldout])


def tier_members(
    key: str, low: np.ndarray, medium: np.ndarray, high: np.ndarray, meta: dict, level: int = 1
) -> list[tuple[str, bytes]]:
    """One sample's tar members, in the sorted order every shard writer uses."""
    return [
        (f"{key}.high.png", encode_png(high, level)),
        (f"{key}.json", json.dumps(meta, sort_keys=True).encode()),
        (f"{key}.low.png", encode_png(low, level)),
        (f"{key}.medium.png", encode_png(medium, level)),
    ]


def tier_meta(sample: dict[str, Any], fold: int, source_shard: str, scores: dict[str, tuple[float, float]]) -> dict:
    """The json of a tier sample made from the decoded synth ``sample``; ``scores``: tier -> (PSNR, SSIM) of the
    low and medium tiers against the ground truth."""
    meta = {
        "key": sample["key"],
        "task": sample["meta"]["task"],
        "fold": fold,
        "source_shard": source_shard,
        "psnr": {t: round(v[0], 4) for t, v in scores.items()},
        "ssim": {t: round(v[1], 5) for t, v in scores.items()},
    }
    return {**meta, **{k: sample["meta"][k] for k in PROVENANCE if k in sample["meta"]}}


def tier_shard_name(source: str, fold: int, split: str) -> str:
    """A training fold's tier shards are ``f<fold>-NNNNNN.tar`` (NNNNNN: the source shard's index); shards of a
    held-out split keep their source's name (``val-000000.tar``)."""
    if split != "train":
        return storage.name(source)
    return f"f{fold}-{storage.name(source).removesuffix('.tar').rsplit('-', 1)[1]}.tar"


def write_tier_shard(location: str, samples: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, dict]]) -> str:
    """Publish the ``(low, medium, high, meta)`` samples as one tier shard at ``location``; returns its sha256."""
    members = [m for low, medium, high, meta in samples for m in tier_members(meta["key"], low, medium, high, meta)]
    return publish_tar(location, members)[0]


def decode_tier_sample(raw: dict[str, Any], origin: str = "?") -> dict[str, Any]:
    """A raw tier sample as ``{"key", "shard", "lq" (low), "medium", "gt" (high), "meta"}``, or ShardFormatError."""
    key = raw.get("__key__", "?")
    out: dict[str, Any] = {}
    for name, data in raw.items():
        if name.startswith("__"):
            continue
        if name not in TIER_MEMBERS:
            raise ShardFormatError(f"shard {origin}: sample {key} has member {name!r}; tier shards hold {TIER_MEMBERS}")
        out[name] = decode_member(name, data, origin, key)
    missing = [m for m in TIER_MEMBERS if m not in out]
    if missing:
        raise ShardFormatError(f"shard {origin}: tier sample {key} lacks {missing}")
    if not isinstance(out["json"], dict):
        raise ShardFormatError(f"shard {origin}: tier sample {key}, member 'json' is not a JSON object")
    shapes = {out[m].shape for m in TIER_MEMBERS[:3]}
    if len(shapes) != 1:
        raise ShardFormatError(f"shard {origin}: tier sample {key} has tiers of different sizes {sorted(shapes)}")
    tiers = {"lq": out["low.png"], "medium": out["medium.png"], "gt": out["high.png"]}
    return {"key": key, "shard": origin, **tiers, "meta": out["json"]}


def is_tier_sample(raw: dict[str, Any]) -> bool:
    """Whether a raw sample is a tier sample (it has one of the three image members)."""
    return any(m in raw for m in TIER_MEMBERS[:3])


def mean_psnr(rows: list[dict], tier: str) -> float:
    """The mean PSNR of ``tier`` over tier-sample json ``rows`` (nan for none): each image counts once."""
    return sum(r["psnr"][tier] for r in rows) / len(rows) if rows else float("nan")


def tier_summary(rows: list[dict]) -> dict[str, float]:
    """``samples``, ``psnr_low``, ``psnr_medium`` and ``margin`` (medium minus low, dB) of ``rows``."""
    low, medium = mean_psnr(rows, "low"), mean_psnr(rows, "medium")
    return {"samples": len(rows), "psnr_low": low, "psnr_medium": medium, "margin": medium - low}


def tier_manifest(shards: list[dict[str, Any]], folds: list[dict[str, Any]], source_digest: str) -> dict[str, Any]:
    """The tier set's manifest (format version :data:`TIER_VERSION`).

    Args:
        shards: every tier shard written, each ``{"name", "sha256", "samples", "fold", "split", "rows"}`` with
            ``rows`` the json of its samples.
        folds: one summary per fold restorer (``fold``, ``trained_on``, ``restored``, PSNRs), listed as given.
        source_digest: the sha256 of the synthesis manifest the tiers were made from.

    ``tasks`` summarises the training folds per task (:func:`tier_summary`), ``heldout`` the other splits.
    """
    by_split: dict[str, dict[str, list[dict]]] = {}
    for shard in shards:
        for row in shard["rows"]:
            by_split.setdefault(shard["split"], {}).setdefault(row["task"], []).append(row)
    summaries = {split: {t: tier_summary(r) for t, r in sorted(tasks.items())} for split, tasks in by_split.items()}
    keep = ("name", "sha256", "samples", "fold", "split")
    return {
        "format": TIER_FORMAT,
        "format_version": TIER_VERSION,
        "source_manifest_sha256": source_digest,
        "shards": [{k: s[k] for k in keep} for s in shards],
        "tasks": summaries.pop("train", {}),
        "heldout": summaries,
        "folds": folds,
    }
