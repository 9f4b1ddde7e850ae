"""From discovered sources to shard specs: splits, folds, tasks, keys and seeds, all derived from content.

Nothing here depends on paths, worker counts or timing, so the same inputs and config always give the same
plan. A sample's key is ``<first 20 hex of its input's sha256>_v<variant>``; its random stream is seeded by
(run seed, that content id, variant, epoch), so any sample can be replayed alone. Splits and folds hash the
*clean* image's content, which keeps every variant of a photo, and every hazy rendering of one clean image, in
the same split and fold. Samples are ordered by key inside each (split, fold) group and cut into shards, so a
fold is a set of whole shards.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from synth.config import SplitConfig
from synth.sources import SourceItem


@dataclass(frozen=True)
class SampleSpec:
    key: str
    item: SourceItem
    variant: int
    task: str
    split: str
    fold: int | None


@dataclass(frozen=True)
class ShardSpec:
    name: str
    split: str
    fold: int | None
    samples: tuple[SampleSpec, ...]


def unit_hash(text: str) -> float:
    """A uniform number in [0, 1) from ``text``'s sha256, stable across machines and Python versions."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 2.0**64


def assign_split(item: SourceItem, cfg: SplitConfig) -> tuple[str, int | None]:
    """(split, fold): an official test or validation split is kept, and a fold the source fixes; otherwise the
    clean content decides."""
    if item.split in ("test", "val"):
        return item.split, None
    if item.fold is not None:
        return "train", item.fold
    u = unit_hash("split:" + item.group)
    if item.split is None and u < cfg.test_fraction:
        return "test", None
    if u >= 1.0 - cfg.val_fraction:
        return "val", None
    fold = int(unit_hash("fold:" + item.group) * cfg.folds) if cfg.folds > 1 else None
    return "train", fold


def sample_rng(seed: int, identity: str, variant: int, epoch: int = 0) -> np.random.Generator:
    """The random stream of one sample at one epoch; materialized shards use epoch 0."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, int(identity[:16], 16), variant, epoch])))


def sample_key(identity: str, variant: int) -> str:
    return f"{identity[:20]}_v{variant:03d}"


def expand(
    items: list[SourceItem],
    task_cycle: list[str],
    variants: int,
    splits: SplitConfig,
    heldout_variants: int | None = None,
) -> list[SampleSpec]:
    """Every sample: pairs once with their dataset's task, clean images ``variants`` times over the recipe's tasks
    (validation and test images ``heldout_variants`` times when given). Variant ``v`` of an image always takes the
    same task and random stream, so more variants add samples and change none."""
    out = []
    for item in items:
        split, fold = assign_split(item, splits)
        if item.lq is not None:
            out.append(SampleSpec(sample_key(item.identity, 0), item, 0, item.task or item.dataset, split, fold))
            continue
        offset = int(item.identity[:8], 16) % len(task_cycle)
        turns = heldout_variants if heldout_variants is not None and split in ("val", "test") else variants
        for v in range(turns):
            task = task_cycle[(offset + v) % len(task_cycle)]
            out.append(SampleSpec(sample_key(item.identity, v), item, v, task, split, fold))
    return out


def shard_name(split: str, fold: int | None, index: int) -> str:
    return f"{split}-f{fold}-{index:06d}" if fold is not None else f"{split}-{index:06d}"


def make_shards(
    samples: list[SampleSpec],
    per_shard: int,
    max_samples: int | None = None,
    existing: dict[str, list[str]] | None = None,
) -> list[ShardSpec]:
    """Cut samples into shards per (split, fold). ``existing`` maps shard names already on disk to their keys:
    those keys are not planned again and new shards are numbered after them (extending a dataset)."""
    existing = existing or {}
    done = {k for keys in existing.values() for k in keys}
    samples = sorted((s for s in samples if s.key not in done), key=lambda s: s.key)
    if max_samples is not None:
        samples = samples[: max(0, max_samples - len(done))]
    groups: dict[tuple[str, int | None], list[SampleSpec]] = defaultdict(list)
    for s in samples:
        groups[(s.split, s.fold)].append(s)
    shards = []
    for (split, fold), group in sorted(groups.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])):
        prefix = shard_name(split, fold, 0)[:-6]
        start = 1 + max((int(n[-6:]) for n in existing if n[:-6] == prefix), default=-1)
        for i in range(0, len(group), per_shard):
            name = shard_name(split, fold, start + i // per_shard)
            shards.append(ShardSpec(name, split, fold, tuple(group[i : i + per_shard])))
    return shards
