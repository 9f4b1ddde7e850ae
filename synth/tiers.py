"""Tier shards: low (the degraded input), medium (held-out restorations) and high (the ground truth).

The one home of the format: written (:func:`write_tier_shard`), named (:func:`tier_shard_name`), listed in a
manifest (:func:`tier_manifest`) and decoded (:func:`decode_tier_sample`) here; cross-validation writes them, the
perceiver, the priors stage and ``clearair.data`` read them. The same guarantees as synthesis shards:
deterministic members, published all-or-nothing (``synth.writer.publish_tar``), only PNG and JSON inside.
Members per sample, in sorted order: ``KEY.high.png``, ``KEY.json``, ``KEY.low.png``, ``KEY.medium.png`` (the
first medium tier: the restoration by ``crossval.model``) and, one per further restorer (``crossval.models``),
``KEY.medium1.png``, ``KEY.medium2.png``, ... numbered without gaps. The json holds the sample's ``key``,
``task``, ``fold``, ``source_shard``, the ``psnr``/``ssim`` of the low and every medium tier (``low``,
``medium``, ``medium1``, ...) and, for synthetic samples, the provenance fresh noise needs (``origin``, ``seed``,
``variant``, ``degradations``). Decoded samples use the synth names: ``lq`` = low, ``gt`` = high, plus
``medium`` (the first medium) and ``mediums`` (every medium, the first included, in order).

The tier manifest (``manifest.json`` beside the shards) lists them; format version 2 adds each shard's ``split``
(``train`` for cross-validated folds, ``val``/``test`` for held-out restorations) and a ``heldout`` summary.
Version 3 adds several medium tiers: ``mediums`` describes the restorer of each (``"restormer/tiny"``), in
member order, and every per-task summary gives each medium's ``psnr_<tier>`` and margin over the low tier
(``margin`` for ``medium``, ``margin<k>`` for ``medium<k>``). A version-1 manifest has training shards only;
version-1 and -2 tier sets have one medium. Every version lists each shard's sha256, which readers check
(:func:`tier_shard_paths`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from synth import storage
from synth.imageio import encode_png
from synth.read import ShardFormatError, ShardURL, decode_member, manifest_urls
from synth.writer import publish_tar

TIER_FORMAT = "clearair-tiers"
TIER_VERSION = 3
TIERS = ("low", "medium", "high")  # the perceiver's labels 0, 1, 2 (clearair.models.perceiver.TIERS)
TIER_MEMBERS = ("low.png", "medium.png", "high.png", "json")  # every sample's; further mediums may follow
FURTHER_MEDIUM = re.compile(r"medium([1-9][0-9]*)\.png")  # medium1.png, medium2.png, ...
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


def medium_tiers(count: int) -> list[str]:
    """The names of ``count`` medium tiers in member order: ``medium``, ``medium1``, ``medium2``, ..."""
    return ["medium" if k == 0 else f"medium{k}" for k in range(count)]


def margin_name(tier: str) -> str:
    """The summary key of a medium tier's margin over the low tier: ``margin``, ``margin1``, ..."""
    return "margin" + tier.removeprefix("medium")


def medium_gains(meta: dict) -> list[float]:
    """Each medium tier's PSNR gain over the low tier in dB, in member order (``medium``, ``medium1``, ...): how
    much the held-out restoration improved on its input. Negative when the restorer made the input worse."""
    psnr = meta["psnr"]
    return [psnr[tier] - psnr["low"] for tier in medium_tiers(medium_count(meta))]


def medium_count(row: dict) -> int:
    """How many medium tiers the tier-sample json ``row`` scores (1 in version-1 and -2 tier sets)."""
    return sum(1 for tier in row["psnr"] if tier == "medium" or FURTHER_MEDIUM.fullmatch(f"{tier}.png"))


def tier_members(
    key: str, low: np.ndarray, mediums: Sequence[np.ndarray], high: np.ndarray, meta: dict, level: int = 1
) -> list[tuple[str, bytes]]:
    """One sample's tar members (``mediums``: the first medium, then the further ones), in the sorted order every
    shard writer uses."""
    images = {"high": high, "low": low, **dict(zip(medium_tiers(len(mediums)), mediums, strict=True))}
    members = [(f"{key}.{tier}.png", encode_png(img, level)) for tier, img in images.items()]
    return sorted([*members, (f"{key}.json", json.dumps(meta, sort_keys=True).encode())])


def tier_meta(sample: dict[str, Any], fold: int, source_shard: str, scores: dict[str, tuple[float, float]]) -> dict:
    """The json of a tier sample made from the decoded synth ``sample``; ``scores``: tier -> (PSNR, SSIM) of the
    low and every medium tier (``medium``, ``medium1``, ...) against the ground truth."""
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


def write_tier_shard(
    location: str, samples: Iterable[tuple[np.ndarray, Sequence[np.ndarray], np.ndarray, dict]]
) -> str:
    """Publish the ``(low, mediums, high, meta)`` samples as one tier shard at ``location``; returns its sha256."""
    members = [m for low, mediums, high, meta in samples for m in tier_members(meta["key"], low, mediums, high, meta)]
    return publish_tar(location, members)[0]


def decode_tier_sample(raw: dict[str, Any], origin: str = "?") -> dict[str, Any]:
    """A raw tier sample as ``{"key", "shard", "lq" (low), "medium" (the first), "mediums" (all), "gt" (high),
    "meta"}``, or ShardFormatError naming the shard, the sample and the member at fault."""
    key = raw.get("__key__", "?")
    out: dict[str, Any] = {}
    for name, data in raw.items():
        if name.startswith("__"):
            continue
        if name not in TIER_MEMBERS and not FURTHER_MEDIUM.fullmatch(name):
            raise ShardFormatError(
                f"shard {origin}: sample {key} has member {name!r}; tier shards hold {TIER_MEMBERS} and further "
                "mediums medium1.png, medium2.png, ..."
            )
        out[name] = decode_member(name, data, origin, key)
    missing = [m for m in TIER_MEMBERS if m not in out]
    if missing:
        raise ShardFormatError(f"shard {origin}: tier sample {key} lacks {missing}")
    if not isinstance(out["json"], dict):
        raise ShardFormatError(f"shard {origin}: tier sample {key}, member 'json' is not a JSON object")
    mediums = [out[f"{tier}.png"] for tier in medium_tiers(_medium_members(out, origin, key))]
    shapes = {img.shape for img in (out["low.png"], *mediums, out["high.png"])}
    if len(shapes) != 1:
        raise ShardFormatError(f"shard {origin}: tier sample {key} has tiers of different sizes {sorted(shapes)}")
    tiers = {"lq": out["low.png"], "medium": mediums[0], "mediums": mediums, "gt": out["high.png"]}
    return {"key": key, "shard": origin, **tiers, "meta": out["json"]}


def _medium_members(members: dict[str, Any], origin: str, key: str) -> int:
    """How many medium tiers a sample's ``members`` hold; ShardFormatError for a gap in their numbers."""
    further = sorted(int(m.group(1)) for m in map(FURTHER_MEDIUM.fullmatch, members) if m)
    for expected, k in enumerate(further, 1):
        if k != expected:
            raise ShardFormatError(
                f"shard {origin}: sample {key} has member 'medium{k}.png' but no 'medium{expected}.png': further "
                "mediums are numbered 1, 2, ... without gaps"
            )
    return 1 + len(further)


def is_tier_sample(raw: dict[str, Any]) -> bool:
    """Whether a raw sample is a tier sample (it has one of the three image members)."""
    return any(m in raw for m in TIER_MEMBERS[:3])


def mean_psnr(rows: list[dict], tier: str) -> float:
    """The mean PSNR of ``tier`` over tier-sample json ``rows`` (nan for none): each image counts once."""
    return sum(r["psnr"][tier] for r in rows) / len(rows) if rows else float("nan")


def tier_summary(rows: list[dict]) -> dict[str, float]:
    """``samples`` and ``psnr_low`` of ``rows``, then per medium tier its ``psnr_<tier>`` and margin over the low
    tier in dB (:func:`margin_name`): ``psnr_medium``, ``margin``, ``psnr_medium1``, ``margin1``, ..."""
    low = mean_psnr(rows, "low")
    summary = {"samples": len(rows), "psnr_low": low}
    for tier in medium_tiers(medium_count(rows[0])):
        summary[f"psnr_{tier}"] = mean_psnr(rows, tier)
        summary[margin_name(tier)] = summary[f"psnr_{tier}"] - low
    return summary


def tier_manifest(
    shards: list[dict[str, Any]], folds: list[dict[str, Any]], source_digest: str, mediums: list[str]
) -> dict[str, Any]:
    """The tier set's manifest (format version :data:`TIER_VERSION`).

    Args:
        shards: every tier shard written, each ``{"name", "sha256", "samples", "fold", "split", "rows"}`` with
            ``rows`` the json of its samples.
        folds: one summary per fold restorer (``fold``, ``trained_on``, ``restored``, PSNRs), listed as given.
        source_digest: the sha256 of the synthesis manifest the tiers were made from.
        mediums: a short description of the restorer of each medium tier, in member order (``"restormer/tiny"``);
            every row must score that many (ValueError otherwise).

    ``tasks`` summarises the training folds per task (:func:`tier_summary`), ``heldout`` the other splits.
    """
    counts = {medium_count(row) for shard in shards for row in shard["rows"]}
    if counts - {len(mediums)}:
        raise ValueError(f"tier rows score {sorted(counts)} medium tiers, but {len(mediums)} are described: {mediums}")
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
        "mediums": list(mediums),
        "shards": [{k: s[k] for k in keep} for s in shards],
        "tasks": summaries.pop("train", {}),
        "heldout": summaries,
        "folds": folds,
    }
